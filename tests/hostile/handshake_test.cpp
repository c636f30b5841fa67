// A hostile source before switchover: the destination refuses, names what was wrong,
// never resumes the VM and never writes a byte of guest memory.
#include <doctest/doctest.h>
#include <sys/resource.h>

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
    CHECK(t.calls().pause == 0);
}

}  // namespace

TEST_CASE("hostile/hello-from-another-version") {
    Target t(pick_backing());
    Conn urgent = Conn::to(t.port());
    urgent.send(proto::encode(proto::Hello{.version = 7, .channel = proto::Channel::urgent,
                                           .mode = lazymig::Mode::postcopy, .session = 1}));
    // The peer is told why, in words that name both versions.
    CHECK(urgent.expect_error_text() == "peer speaks protocol version 7, this side speaks 3");
    CHECK(t.failure() == "urgent channel from the source: peer speaks protocol version 7, this side speaks 3");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/not-a-lazymig-peer") {
    Target t(pick_backing());
    Conn urgent = Conn::to(t.port());
    urgent.send(std::string_view("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
    CHECK(t.failure() ==
          "urgent channel from the source: not a lazymig frame: magic 0x20544547, expected 0x474d5a4c");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/truncated-header") {
    Target t(pick_backing());
    Conn urgent = Conn::to(t.port());
    const auto hello = proto::encode(proto::Hello{.channel = proto::Channel::urgent, .mode = lazymig::Mode::postcopy});
    urgent.send(std::span(hello).first(proto::kHeaderSize / 2));
    urgent.shutdown_write();
    CHECK(t.failure() ==
          "urgent channel from the source: truncated frame: the peer closed the connection inside a frame header");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/truncated-payload") {
    Target t(pick_backing());
    Conn urgent = Conn::to(t.port());
    const auto hello = proto::encode(proto::Hello{.channel = proto::Channel::urgent, .mode = lazymig::Mode::postcopy});
    urgent.send(std::span(hello).first(proto::kHeaderSize + 8));
    urgent.shutdown_write();
    const std::string e = t.failure();
    CHECK_MESSAGE(e.starts_with("urgent channel from the source: truncated HELLO frame: "), e);
    CHECK_MESSAGE(e.ends_with("the peer closed the connection inside it"), e);
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/closes-before-hello") {
    Target t(pick_backing());
    Conn urgent = Conn::to(t.port());
    urgent.shutdown_write();
    CHECK(t.failure() == "urgent channel from the source: peer closed the connection while HELLO was expected");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/unknown-message-type") {
    Target t(pick_backing());
    HostileSource src(t.port());
    // A header of type 200 where the region table belongs; otherwise well formed.
    auto f = proto::encode_empty(proto::Type::region_ack);
    f[4] = std::byte{200};
    src.urgent.send(f);
    CHECK(t.failure() == "urgent channel from the source: unknown message type 200");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/unknown-message-type-on-bulk") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.region_table();  // bulk channels are read only from here on
    auto f = proto::encode_empty(proto::Type::push_done);
    f[4] = std::byte{0};
    src.bulk.send(f);
    CHECK(t.failure() == "bulk channel from the source: unknown message type 0");
    check_not_resumed(t);
    t.check_nothing_placed();
}

// PAGES before any REGION_TABLE are not even read: the peer then leaves without a table,
// and not one page was placed.
TEST_CASE("hostile/pages-before-region-table-never-placed") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.bulk.send(pages_frame(0, 0, 8));
    src.urgent.send(proto::encode(proto::DeviceState{std::vector<std::byte>(16)}));
    CHECK(t.failure() == "urgent channel from the source: expected REGION_TABLE, got DEVICE_STATE");
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/region-table-mismatch") {
    Target t(pick_backing());
    HostileSource src(t.port());
    proto::RegionTable table;
    table.regions.push_back({"ram0", Target::kSize / 2, kPage, Backing::anon});
    src.urgent.send(proto::encode(table));
    const std::string why = "region table mismatch: region 0 'ram0': size 8388608 here, 4194304 at the source";
    CHECK(src.urgent.expect_error_text() == why);
    CHECK(t.failure() == why);
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/region-table-other-name") {
    Target t(pick_backing());
    HostileSource src(t.port());
    proto::RegionTable table;
    table.regions.push_back({"rom", Target::kSize, kPage, Backing::anon});
    src.urgent.send(proto::encode(table));
    const std::string why = "region table mismatch: region 0 is 'ram0' here, 'rom' at the source";
    CHECK(src.urgent.expect_error_text() == why);
    CHECK(t.failure() == why);
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/bulk-hello-from-another-session") {
    Target t(pick_backing());
    Conn urgent = Conn::to(t.port());
    urgent.send(proto::encode(proto::Hello{.channel = proto::Channel::urgent, .mode = lazymig::Mode::postcopy,
                                           .session = 0x1111}));
    urgent.expect(proto::Type::hello_ack);
    Conn bulk = Conn::to(t.port());
    bulk.send(proto::encode(proto::Hello{.channel = proto::Channel::bulk, .mode = lazymig::Mode::postcopy,
                                         .session = 0x2222}));
    const std::string why =
        "bulk channel from the source: HELLO from another migration (session 0x2222, expected 0x1111)";
    CHECK(bulk.expect_error_text() == why);
    CHECK(t.failure() == why);
    check_not_resumed(t);
    t.check_nothing_placed();
}

TEST_CASE("hostile/device-state-before-region-table") {
    Target t(pick_backing());
    HostileSource src(t.port());
    src.urgent.send(proto::encode(proto::DeviceState{std::vector<std::byte>(64)}));
    CHECK(t.failure() == "urgent channel from the source: expected REGION_TABLE, got DEVICE_STATE");
    check_not_resumed(t);
    t.check_nothing_placed();
}

// An authenticated peer whose first header announces a 200 MiB DEVICE_STATE is refused
// from the header alone: the destination's peak memory does not grow by it.
TEST_CASE("hostile/oversized-first-header-refused-without-allocation") {
    Target t(Backing::anon);
    rusage before{};
    ::getrusage(RUSAGE_SELF, &before);
    Conn urgent = Conn::to(t.port());
    proto::Frame f(proto::kHeaderSize);
    proto::write_header(std::span<std::byte, proto::kHeaderSize>(f.data(), proto::kHeaderSize),
                        proto::Type::device_state, 200u << 20);
    urgent.send(f);
    CHECK(t.failure() == "urgent channel from the source: DEVICE_STATE frame of 209715200 bytes exceeds the 1048576 "
                         "bytes allowed here");
    rusage after{};
    ::getrusage(RUSAGE_SELF, &after);
    CHECK((after.ru_maxrss - before.ru_maxrss) < 64 * 1024);  // KiB: far below the 200 MiB announced
    check_not_resumed(t);
}

// The same header from a peer without the key never reaches the frame parser.
TEST_CASE("hostile/oversized-header-without-key-refused-by-tls") {
    Target t(Backing::anon);
    Conn raw = Conn::to_plain(t.port());
    proto::Frame f(proto::kHeaderSize);
    proto::write_header(std::span<std::byte, proto::kHeaderSize>(f.data(), proto::kHeaderSize),
                        proto::Type::device_state, 200u << 20);
    raw.send(f);
    std::byte b[64];
    ssize_t n;
    while ((n = ::recv(raw.fd(), b, sizeof b, 0)) > 0) {}  // until the listener closes it
    CHECK(n <= 0);
    CHECK(t.dst().stats().refused_peers == 1);
    CHECK(t.dst().stats().phase == lazymig::Phase::idle);
    check_not_resumed(t);
}
