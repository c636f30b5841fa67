// Hostile PAGES frames: refused whole, before any byte reaches the guest. After the VM
// resumed, a refusal also poisons every missing page: a touch raises SIGBUS, never reads
// zeroes.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include "tests/hostile/target.hpp"

using namespace hostile;

namespace {

Backing pick_backing() {
    Backing b = Backing::anon;
    SUBCASE("anon") { b = Backing::anon; }
    SUBCASE("memfd") { b = Backing::memfd; }
    return b;
}

void check_not_resumed(Target& t) {
    CHECK(t.calls().load == 0);
    CHECK(t.calls().resume == 0);
}

}  // namespace

TEST_CASE("hostile/pages-wrong-checksum-after-resume") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    src.device_state(1000);
    CHECK(t.calls().load == 1);
    CHECK(t.calls().device_bytes == 1000);
    CHECK(t.calls().resume == 1);

    auto f = pages_frame(0, 0, 4, 0b0100);
    const std::uint32_t sent = [&] {
        std::uint32_t c;
        std::memcpy(&c, f.data() + 12, 4);
        return c;
    }();
    f.back() ^= std::byte{0x01};  // one bit of the last page's data
    src.bulk.send(f);
    // The error names the refused frame and what it means for the VM that ran here.
    const std::string e = t.failure();
    CHECK_MESSAGE(e.starts_with(fmt::format("bulk channel from the source: PAGES frame checksum mismatch for region 0 "
                                            "pages 0..3 (got {:#010x}, computed ",
                                            sent)),
                  e);
    CHECK_MESSAGE(e.ends_with("); the frame was refused and none of its pages placed; the VM cannot continue: "
                              "2048 of 2048 pages never arrived (poisoned: a touch raises SIGBUS): ram0 pages 0..2047; "
                              "its vCPUs were stopped"),
                  e);
    // vCPUs paused after the failure, and the VMM is told the same words.
    CHECK(t.calls().pause == 1);
    CHECK(t.calls().error_event() == e);
    t.check_nothing_placed();
    // Poisoned, not zero-filled: a touch of a refused page and of a never-sent one.
    CHECK(to_string(touch_in_child(t.page(0))) == std::string("SIGBUS"));
    CHECK(to_string(touch_in_child(t.page(2))) == std::string("SIGBUS"));
    CHECK(to_string(touch_in_child(t.page(Target::kPages - 1))) == std::string("SIGBUS"));
}

TEST_CASE("hostile/pages-wrong-checksum-on-urgent-after-resume") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    src.device_state();
    auto f = pages_frame(0, 100, 2);
    f[proto::kHeaderSize + proto::kPagesMetaFixed + 1] ^= std::byte{0x80};  // first data byte
    src.urgent.send(f);
    const std::string e = t.failure();
    CHECK_MESSAGE(e.starts_with("urgent channel from the source: PAGES frame checksum mismatch for region 0 pages "
                                "100..101"),
                  e);
    CHECK_MESSAGE(e.ends_with("; the VM cannot continue: 2048 of 2048 pages never arrived (poisoned: a touch raises "
                              "SIGBUS): ram0 pages 0..2047; its vCPUs were stopped"),
                  e);
    CHECK(t.calls().pause == 1);
    t.check_nothing_placed();
    CHECK(to_string(touch_in_child(t.page(100))) == std::string("SIGBUS"));
}

TEST_CASE("hostile/pages-out-of-range") {
    struct Case {
        proto::Frame frame;
        std::string why;
    };
    std::vector<Case> cases;
    // Page 2047 exists, page 2048 does not: the frame is refused whole.
    cases.push_back({pages_frame(0, Target::kPages - 1, 2),
                     "bulk channel from the source: PAGES frame for pages 2047..2048 of region 0 'ram0', which has "
                     "2048 pages"});
    cases.push_back({pages_frame(0, 1ull << 40, 1),
                     "bulk channel from the source: PAGES frame for pages 1099511627776..1099511627776 of region 0 "
                     "'ram0', which has 2048 pages"});
    cases.push_back({pages_frame(1, 0, 1), "bulk channel from the source: PAGES frame for region 1, but there are 1 "
                                           "regions"});
    auto many = pages_frame(0, 0, 1);
    const std::uint32_t count = proto::kMaxPagesPerFrame + 1;
    std::memcpy(many.data() + proto::kHeaderSize + 4, &count, 4);
    cases.push_back({many, "bulk channel from the source: PAGES frame with 1025 pages (expected 1 to 1024)"});

    const Backing backing = pick_backing();
    for (const auto& c : cases) {
        CAPTURE(c.why);
        Target t(backing);
        HostileSource src(t.port());
        src.region_table();
        src.bulk.send(c.frame);
        CHECK(t.failure() == c.why);
        check_not_resumed(t);
        t.check_nothing_placed();
    }
}

TEST_CASE("hostile/pages-length-disagrees-with-bitmap") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    // Four pages of data, but the bitmap says page 0 is zero: the length is one page long.
    auto f = pages_frame(0, 8, 4);
    f[proto::kHeaderSize + proto::kPagesMetaFixed] = std::byte{0x01};
    src.bulk.send(f);
    CHECK(t.failure() == "bulk channel from the source: PAGES frame length 16401 does not match 4 pages (3 non-zero) "
                         "of 4096 bytes (expected 12305)");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/pages-shorter-than-metadata") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    auto f = pages_frame(0, 0, 16);
    set_length(f, proto::kPagesMetaFixed + 1);  // the bitmap of 16 pages needs 2 bytes
    src.bulk.send(std::span(f).first(proto::kHeaderSize + proto::kPagesMetaFixed + 1));
    CHECK(t.failure() == "bulk channel from the source: PAGES frame of 17 bytes is shorter than its metadata");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/truncated-pages-frame") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    const auto f = pages_frame(0, 0, 64);
    src.bulk.send(std::span(f).first(f.size() / 2));
    src.bulk.shutdown_write();
    const std::string e = t.failure();
    CHECK_MESSAGE(e.starts_with("bulk channel from the source: truncated PAGES frame: "), e);
    check_not_resumed(t);
    t.check_nothing_placed();
}

// Bitmap bits past `count` are refused. Before they were, each lowered nonzero_pages(),
// the length and checksum checks passed with a page of data missing, and the placer
// copied a page from the receive buffer past the verified data: bytes of an earlier
// frame landed in a page the peer never sent.
TEST_CASE("hostile/pages-bitmap-padding-bits") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    // A legitimate page first, so the receive buffer holds its bytes (0xA0)...
    src.bulk.send(pages_frame(0, 100, 1));
    // ...then page 5, one page, bitmap 0b10: bit 1 is padding; no data, checksum right.
    proto::PagesMeta meta;
    meta.count = 1;
    meta.first = 5;
    meta.zero[0] = 0b10;
    proto::Frame f(proto::kHeaderSize + proto::kPagesMetaFixed + 1);
    f.resize(proto::encode_pages_head(f.data(), meta, kPage, {}));
    src.bulk.send(f);
    CHECK(t.failure() == "bulk channel from the source: PAGES frame for 1 pages sets zero-bitmap padding bits (0x02 "
                         "in its last bitmap byte)");
    check_not_resumed(t);
    CHECK(t.dst().stats().pages_present == 1);
    CHECK(t.page_mapped(100));
    CHECK_FALSE(t.page_mapped(5));
    if (t.mem().region().backing == Backing::memfd) {
        CHECK(t.file_nonzero_bytes(5, 1) == 0);
        CHECK(t.file_nonzero_bytes(100, 1) == kPage);
    }
}

// Pre-copy frames are only believed where pre-copy runs: on a bulk channel of a
// pre-copy migration, before that channel's PRECOPY_END.
TEST_CASE("hostile/precopy-pages-in-postcopy-mode") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    src.bulk.send(pages_frame(0, 0, 4, 0, 0xA0, proto::Type::precopy_pages));
    CHECK(t.failure() == "bulk channel from the source: PRECOPY_PAGES on a channel that carries no pre-copy");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/precopy-pages-after-precopy-end") {
    Target t(pick_backing());
    HostileSource src(t.port(), 0x5eed, lazymig::Mode::hybrid);
    src.region_table();
    src.bulk.send(pages_frame(0, 0, 4, 0, 0xA0, proto::Type::precopy_pages));
    src.bulk.send(proto::encode_empty(proto::Type::precopy_end));
    src.bulk.send(pages_frame(0, 8, 4, 0, 0xA0, proto::Type::precopy_pages));
    CHECK(t.failure() == "bulk channel from the source: PRECOPY_PAGES after PRECOPY_END");
    check_not_resumed(t);
}

TEST_CASE("hostile/stale-outside-the-region") {
    Target t(pick_backing());
    HostileSource src(t.port(), 0x5eed, lazymig::Mode::hybrid);
    src.region_table();
    src.bulk.send(proto::encode_empty(proto::Type::precopy_end));
    src.urgent.send(proto::encode(proto::StaleSet{{{.region = 0, .count = 100, .first = Target::kPages - 8}}}));
    CHECK(src.urgent.expect_error_text() ==
          fmt::format("urgent channel from the source: STALE pages {}..{} of region 0, which has {} pages",
                      Target::kPages - 8, Target::kPages + 91, Target::kPages));
    CHECK(t.failure() == fmt::format("urgent channel from the source: STALE pages {}..{} of region 0, which has {} pages",
                                     Target::kPages - 8, Target::kPages + 91, Target::kPages));
    check_not_resumed(t);
}

// A STALE set in a post-copy migration is a protocol violation, not a request to forget.
TEST_CASE("hostile/stale-in-postcopy-mode") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();
    src.urgent.send(proto::encode(proto::StaleSet{{{.region = 0, .count = 1, .first = 0}}}));
    CHECK(t.failure() == "urgent channel from the source: unexpected STALE before the device state");
    check_not_resumed(t);
}
