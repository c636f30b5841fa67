// Every message type survives encode → parse_header → checksum → decode unchanged.
#include <doctest/doctest.h>

#include <vector>

#include <fmt/format.h>

#include "tests/core/frame_util.hpp"

using namespace core_test;
using lazymig::Backing;
using lazymig::Mode;

TEST_CASE("protocol/frame-header-layout") {
    const auto f = proto::encode(proto::HelloAck{});
    REQUIRE(f.size() == proto::kHeaderSize + 4);
    // "LZMG" as bytes, type, zero flags and reserved, little-endian length.
    CHECK(f[0] == std::byte{'L'});
    CHECK(f[1] == std::byte{'Z'});
    CHECK(f[2] == std::byte{'M'});
    CHECK(f[3] == std::byte{'G'});
    CHECK(f[4] == b(2));
    CHECK(f[5] == b(0));
    CHECK(f[6] == b(0));
    CHECK(f[7] == b(0));
    CHECK(f[8] == b(4));
    CHECK(f[9] == b(0));
    // The checksum covers header bytes 0..11 and the payload, not its own field.
    CHECK(proto::frame_checksum(head_of(f), payload_of(f)) ==
          lazymig::crc32c(lazymig::crc32c(0, f.data(), 12), f.data() + 16, 4));
}

TEST_CASE("protocol/roundtrip-hello") {
    for (auto ch : {proto::Channel::urgent, proto::Channel::bulk}) {
        for (auto mode : {Mode::postcopy, Mode::precopy, Mode::hybrid}) {
            const proto::Hello in{.version = proto::kVersion, .channel = ch, .mode = mode,
                                  .session = 0x0123456789abcdefull};
            const auto f = proto::encode(in);
            parse_verified(f, proto::Type::hello);
            CHECK(payload_of(f).size() == 16);
            auto out = proto::decode_hello(payload_of(f));
            REQUIRE_MESSAGE(out.has_value(), err_of(out));
            CHECK(out->version == proto::kVersion);
            CHECK(out->channel == ch);
            CHECK(out->mode == mode);
            CHECK(out->session == 0x0123456789abcdefull);
        }
    }
}

TEST_CASE("protocol/roundtrip-hello-ack") {
    const auto f = proto::encode(proto::HelloAck{});
    parse_verified(f, proto::Type::hello_ack);
    auto out = proto::decode_hello_ack(payload_of(f));
    REQUIRE_MESSAGE(out.has_value(), err_of(out));
    CHECK(out->version == proto::kVersion);
}

TEST_CASE("protocol/roundtrip-error") {
    for (const std::string& text : {std::string(), std::string("region table mismatch: ü"), std::string(4096, 'x')}) {
        const auto f = proto::encode(proto::ErrorMsg{.code = 71, .text = text});
        parse_verified(f, proto::Type::error);
        auto out = proto::decode_error(payload_of(f));
        REQUIRE_MESSAGE(out.has_value(), err_of(out));
        CHECK(out->code == 71);
        CHECK(out->text == text);
    }
}

TEST_CASE("protocol/roundtrip-region-table") {
    proto::RegionTable in;
    in.regions.push_back({"ram0", 1ull << 30, 4096, Backing::anon});
    in.regions.push_back({"ram1", 3ull << 33, 4096, Backing::memfd});
    in.regions.push_back({std::string(255, 'n'), 2ull << 20, 2u << 20, Backing::hugetlbfs});
    const auto f = proto::encode(in);
    parse_verified(f, proto::Type::region_table);
    auto out = proto::decode_region_table(payload_of(f));
    REQUIRE_MESSAGE(out.has_value(), err_of(out));
    REQUIRE(out->regions.size() == in.regions.size());
    for (std::size_t i = 0; i < in.regions.size(); ++i) {
        CAPTURE(i);
        CHECK(out->regions[i].name == in.regions[i].name);
        CHECK(out->regions[i].size == in.regions[i].size);
        CHECK(out->regions[i].page_size == in.regions[i].page_size);
        CHECK(out->regions[i].backing == in.regions[i].backing);
    }
}

TEST_CASE("protocol/roundtrip-region-table-of-guest-regions") {
    std::vector<lazymig::GuestRegion> ours = {
        {.name = "ram0", .host = nullptr, .size = 8u << 20, .page_size = 4096, .backing = Backing::anon},
        {.name = "ram1", .host = nullptr, .size = 4u << 20, .page_size = 2u << 20, .backing = Backing::hugetlbfs},
    };
    const auto f = proto::encode(proto::region_table_of(ours));
    parse_verified(f, proto::Type::region_table);
    auto out = proto::decode_region_table(payload_of(f));
    REQUIRE_MESSAGE(out.has_value(), err_of(out));
    auto same = proto::check_region_table(*out, ours);
    CHECK_MESSAGE(same.has_value(), err_of(same));
}

TEST_CASE("protocol/roundtrip-device-state") {
    std::vector<std::byte> blob(100'000);
    for (std::size_t i = 0; i < blob.size(); ++i) blob[i] = b(static_cast<unsigned>(i * 31 + 7));
    for (const auto& in : {std::vector<std::byte>{}, blob}) {
        const auto f = proto::encode(proto::DeviceState{in});
        parse_verified(f, proto::Type::device_state);
        const auto p = payload_of(f);
        CHECK(std::vector<std::byte>(p.begin(), p.end()) == in);
    }
}

TEST_CASE("protocol/roundtrip-page-request") {
    const proto::PageRequest in{.region = 3, .count = proto::kMaxPagesPerFrame, .first = 0x1'0000'0001ull};
    const auto f = proto::encode(in);
    parse_verified(f, proto::Type::page_request);
    auto out = proto::decode_page_request(payload_of(f));
    REQUIRE_MESSAGE(out.has_value(), err_of(out));
    CHECK(out->region == 3);
    CHECK(out->count == proto::kMaxPagesPerFrame);
    CHECK(out->first == 0x1'0000'0001ull);
}

TEST_CASE("protocol/roundtrip-stale") {
    proto::StaleSet in;
    in.runs = {{.region = 0, .count = 1, .first = 0}, {.region = 2, .count = UINT32_MAX, .first = 0x1'0000'0001ull}};
    const auto f = proto::encode(in);
    CHECK(f.size() == proto::kHeaderSize + 4 + 2 * 16);
    parse_verified(f, proto::Type::stale);
    auto out = proto::decode_stale(payload_of(f));
    REQUIRE_MESSAGE(out.has_value(), err_of(out));
    REQUIRE(out->runs.size() == 2);
    CHECK(out->runs[1].region == 2);
    CHECK(out->runs[1].count == UINT32_MAX);
    CHECK(out->runs[1].first == 0x1'0000'0001ull);
    // The largest set fits one control frame.
    in.runs.assign(proto::kMaxStaleRuns, {.region = 1, .count = 1, .first = 5});
    const auto big = proto::encode(in);
    parse_verified(big, proto::Type::stale);
    auto got = proto::decode_stale(payload_of(big));
    REQUIRE_MESSAGE(got.has_value(), err_of(got));
    CHECK(got->runs.size() == proto::kMaxStaleRuns);
}

TEST_CASE("protocol/roundtrip-recover-frames") {
    const auto r = proto::encode(proto::Resume{.session = 0x0123456789abcdefull, .bulk_channels = 3});
    CHECK(r.size() == proto::kHeaderSize + 4 + 8 + 1);
    parse_verified(r, proto::Type::resume);
    auto resume = proto::decode_resume(payload_of(r));
    REQUIRE_MESSAGE(resume.has_value(), err_of(resume));
    CHECK(resume->version == proto::kVersion);
    CHECK(resume->session == 0x0123456789abcdefull);
    CHECK(resume->bulk_channels == 3);

    proto::Lacking in;
    in.runs = {{.region = 0, .count = 64, .first = 100}, {.region = 1, .count = UINT32_MAX, .first = 7}};
    const auto l = proto::encode(in);
    CHECK(l.size() == proto::kHeaderSize + 4 + 2 * 16);
    parse_verified(l, proto::Type::lacking);
    auto lacking = proto::decode_lacking(payload_of(l));
    REQUIRE_MESSAGE(lacking.has_value(), err_of(lacking));
    REQUIRE(lacking->runs.size() == 2);
    CHECK(lacking->runs[0].first == 100);
    CHECK(lacking->runs[0].count == 64);
    CHECK(lacking->runs[1].region == 1);
    CHECK(lacking->runs[1].count == UINT32_MAX);

    const auto e = proto::encode(proto::LackingEnd{0x1'0000'0040ull});
    parse_verified(e, proto::Type::lacking_end);
    auto end = proto::decode_lacking_end(payload_of(e));
    REQUIRE_MESSAGE(end.has_value(), err_of(end));
    CHECK(end->pages == 0x1'0000'0040ull);
    CHECK(proto::to_string(proto::Type::resume) == "RESUME");
    CHECK(proto::to_string(proto::Type::lacking) == "LACKING");
    CHECK(proto::to_string(proto::Type::lacking_end) == "LACKING_END");
}

TEST_CASE("protocol/rejects-bad-recover-frames") {
    auto other = proto::encode(proto::Resume{.version = 7, .session = 1, .bulk_channels = 1});
    auto v = proto::decode_resume(payload_of(other));
    REQUIRE(!v.has_value());
    CHECK(v.error().message() == fmt::format("RESUME: peer speaks version 7, we speak {}", proto::kVersion));
    CHECK(v.error().kind == lazymig::ErrorClass::peer_violation);
    for (std::uint8_t n : {std::uint8_t{0}, std::uint8_t(proto::kMaxBulkChannels + 1)}) {
        auto bad = proto::decode_resume(payload_of(proto::encode(proto::Resume{.session = 1, .bulk_channels = n})));
        REQUIRE(!bad.has_value());
        CHECK(bad.error().message() ==
              fmt::format("RESUME: {} bulk channels (expected 1 to {})", n, proto::kMaxBulkChannels));
    }
    auto r = proto::encode(proto::Resume{.session = 1});
    CHECK(!proto::decode_resume(payload_of(r).first(payload_of(r).size() - 1)).has_value());
    auto empty = proto::decode_lacking(payload_of(proto::encode(proto::Lacking{})));
    REQUIRE(!empty.has_value());
    CHECK(empty.error().message() == fmt::format("LACKING: 0 runs (expected 1 to {})", proto::kMaxStaleRuns));
    proto::Lacking zero;
    zero.runs = {{.region = 2, .count = 0, .first = 9}};
    auto z = proto::decode_lacking(payload_of(proto::encode(zero)));
    REQUIRE(!z.has_value());
    CHECK(z.error().message() == "LACKING: run 0 of region 2 has no pages");
    auto e = proto::encode(proto::LackingEnd{5});
    CHECK(!proto::decode_lacking_end(payload_of(e).first(7)).has_value());
}

TEST_CASE("protocol/roundtrip-round-marks") {
    for (auto t : {proto::Type::round_end, proto::Type::round_ack}) {
        const auto f = proto::encode(t, proto::RoundMark{7});
        parse_verified(f, t);
        auto out = proto::decode_round(t, payload_of(f));
        REQUIRE_MESSAGE(out.has_value(), err_of(out));
        CHECK(out->round == 7);
    }
    auto zero = proto::decode_round(proto::Type::round_ack, payload_of(proto::encode(proto::Type::round_ack, {0})));
    REQUIRE(!zero.has_value());
    CHECK(zero.error().message() == "ROUND_ACK: round 0 (rounds count from 1)");
}

TEST_CASE("protocol/roundtrip-epoch-frames") {
    const auto begin = proto::encode(proto::EpochBegin{.epoch = 3, .pages = 10000, .device_bytes = 77});
    parse_verified(begin, proto::Type::epoch_begin);
    auto b = proto::decode_epoch_begin(payload_of(begin));
    REQUIRE_MESSAGE(b.has_value(), err_of(b));
    CHECK(b->epoch == 3);
    CHECK(b->pages == 10000);
    CHECK(b->device_bytes == 77);
    const auto end = proto::encode(proto::EpochEnd{.epoch = 3, .frames = 11, .checksum = 0xdeadbeef});
    parse_verified(end, proto::Type::epoch_end);
    auto e = proto::decode_epoch_end(payload_of(end));
    REQUIRE_MESSAGE(e.has_value(), err_of(e));
    CHECK(e->epoch == 3);
    CHECK(e->frames == 11);
    CHECK(e->checksum == 0xdeadbeef);
    const auto ack = proto::encode(proto::EpochAck{.epoch = 9});
    parse_verified(ack, proto::Type::epoch_ack);
    auto a = proto::decode_epoch_ack(payload_of(ack));
    REQUIRE_MESSAGE(a.has_value(), err_of(a));
    CHECK(a->epoch == 9);
    const std::vector<std::byte> blob(100, std::byte{7});
    const auto dev = proto::encode_epoch_device(blob);
    parse_verified(dev, proto::Type::epoch_device);
    CHECK(std::vector<std::byte>(payload_of(dev).begin(), payload_of(dev).end()) == blob);
    CHECK(err_of(proto::decode_epoch_ack(payload_of(proto::encode(proto::EpochAck{0})))) ==
          "EPOCH_ACK: epoch 0 (epochs count from 1)");
    CHECK(err_of(proto::decode_epoch_begin(payload_of(proto::encode(proto::EpochBegin{0, 1, 0})))) ==
          "EPOCH_BEGIN: epoch 0 (epochs count from 1)");
    CHECK(err_of(proto::decode_epoch_begin(payload_of(proto::encode(proto::EpochBegin{1, 1, proto::kMaxDeviceState + 1})))) ==
          "EPOCH_BEGIN: 268435457 bytes of device state exceed the limit of 268435456");
    CHECK(err_of(proto::decode_epoch_end(payload_of(proto::encode(proto::EpochEnd{0, 1, 0})))) ==
          "EPOCH_END: epoch 0 (epochs count from 1)");
    // The fold depends on every frame checksum and their order.
    CHECK(proto::epoch_fold(proto::epoch_fold(0, 1), 2) != proto::epoch_fold(proto::epoch_fold(0, 2), 1));
}

TEST_CASE("protocol/rejects-bad-stale") {
    auto empty = proto::decode_stale(payload_of(proto::encode(proto::StaleSet{})));
    REQUIRE(!empty.has_value());
    CHECK(empty.error().message() == fmt::format("STALE: 0 runs (expected 1 to {})", proto::kMaxStaleRuns));
    CHECK(empty.error().kind == lazymig::ErrorClass::peer_violation);
    proto::StaleSet zero;
    zero.runs = {{.region = 1, .count = 0, .first = 9}};
    auto z = proto::decode_stale(payload_of(proto::encode(zero)));
    REQUIRE(!z.has_value());
    CHECK(z.error().message() == "STALE: run 0 of region 1 has no pages");
    auto f = proto::encode(proto::StaleSet{{{.region = 1, .count = 2, .first = 9}}});
    auto cut = proto::decode_stale(payload_of(f).first(payload_of(f).size() - 1));
    CHECK(!cut.has_value());
}

TEST_CASE("protocol/roundtrip-empty-messages") {
    for (auto t : {proto::Type::region_ack, proto::Type::resumed, proto::Type::push_done, proto::Type::complete,
                   proto::Type::precopy_end}) {
        CAPTURE(proto::to_string(t));
        const auto f = proto::encode_empty(t);
        CHECK(f.size() == proto::kHeaderSize);
        const auto h = parse_verified(f, t);
        CHECK(h.length == 0);
    }
}

TEST_CASE("protocol/type-names") {
    CHECK(proto::to_string(proto::Type::invalid) == "INVALID");
    CHECK(proto::to_string(proto::Type::pages) == "PAGES");
    CHECK(proto::to_string(proto::Type::precopy_pages) == "PRECOPY_PAGES");
    CHECK(proto::to_string(proto::Type::precopy_end) == "PRECOPY_END");
    CHECK(proto::to_string(proto::Type::stale) == "STALE");
    CHECK(proto::to_string(proto::Type::precopy_lz4) == "PRECOPY_LZ4");
    CHECK(proto::to_string(proto::Type::round_ack) == "ROUND_ACK");
    CHECK(proto::to_string(proto::Type::epoch_begin) == "EPOCH_BEGIN");
    CHECK(proto::to_string(proto::Type::epoch_pages) == "EPOCH_PAGES");
    CHECK(proto::to_string(proto::Type::epoch_device) == "EPOCH_DEVICE");
    CHECK(proto::to_string(proto::Type::epoch_end) == "EPOCH_END");
    CHECK(proto::to_string(proto::Type::epoch_ack) == "EPOCH_ACK");
    CHECK(proto::to_string(proto::Channel::replication) == "replication");
    CHECK(proto::to_string(proto::Type{200}) == "INVALID");
    CHECK(proto::to_string(proto::Channel::urgent) == "urgent");
    CHECK(proto::to_string(proto::Channel::bulk) == "bulk");
    CHECK(proto::to_string(proto::Channel{9}) == "invalid");
}
