// What the protocol refuses, and the exact words it refuses it with.
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <functional>
#include <vector>

#include <fmt/format.h>

#include "src/net/frames.hpp"
#include "src/net/socket.hpp"
#include "tests/core/frame_util.hpp"

using namespace core_test;
using lazymig::Backing;
using lazymig::Mode;

namespace {

std::string header_error(const proto::Frame& f) {
    auto h = proto::parse_header(head_of(f), "urgent channel");
    return h ? std::string("(accepted)") : h.error().message();
}

// A header alone, as a peer could send it: `length` need not match anything.
proto::Frame raw_header(unsigned type, std::uint32_t length, unsigned flags = 0, std::uint16_t reserved = 0) {
    proto::Frame f(proto::kHeaderSize);
    put_le<std::uint32_t>(f.data(), proto::kMagic);
    f[4] = b(type);
    f[5] = b(flags);
    put_le<std::uint16_t>(f.data() + 6, reserved);
    put_le<std::uint32_t>(f.data() + 8, length);
    return f;
}

struct Field {
    std::size_t at, size;
};

// Every proper prefix of a valid payload is refused, naming the message, the offset of
// the field that does not fit and how many of its bytes are there.
template <class Decode>
void check_truncations(std::string_view type, std::span<const std::byte> full, const std::vector<Field>& fields,
                       Decode decode) {
    for (std::size_t len = 0; len < full.size(); ++len) {
        CAPTURE(len);
        const Field* f = nullptr;
        for (const auto& c : fields)
            if (c.at <= len && len < c.at + c.size) f = &c;
        REQUIRE(f != nullptr);
        auto r = decode(full.first(len));
        REQUIRE_FALSE(r.has_value());
        CHECK(r.error().message() ==
              fmt::format("{}: truncated: need {} bytes at offset {}, have {}", type, f->size, f->at, len - f->at));
    }
    std::vector<std::byte> longer(full.begin(), full.end());
    longer.push_back(b(0));
    auto r = decode(std::span<const std::byte>(longer));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().message() == fmt::format("{}: 1 unexpected trailing bytes", type));
}

}  // namespace

TEST_CASE("protocol/rejects-bad-magic") {
    auto f = proto::encode(proto::HelloAck{});
    f[3] = std::byte{'X'};
    CHECK(header_error(f) == "urgent channel: not a lazymig frame: magic 0x584d5a4c, expected 0x474d5a4c");
    const std::string http = "GET / HTTP/1.1\r\n";
    proto::Frame g(proto::kHeaderSize);
    std::memcpy(g.data(), http.data(), g.size());
    CHECK(header_error(g) == "urgent channel: not a lazymig frame: magic 0x20544547, expected 0x474d5a4c");
}

TEST_CASE("protocol/rejects-unknown-type") {
    CHECK(header_error(raw_header(0, 0)) == "urgent channel: unknown message type 0");
    CHECK(header_error(raw_header(12, 0)) == "urgent channel: unknown message type 12");
    CHECK(header_error(raw_header(200, 0)) == "urgent channel: unknown message type 200");
    for (unsigned t = 1; t <= proto::kTypeLast; ++t) CHECK(header_error(raw_header(t, 0)) == "(accepted)");
    CHECK(header_error(raw_header(49, 0)) == "urgent channel: unknown message type 49");
    for (unsigned t = proto::kPrecopyTypeFirst; t <= proto::kPrecopyTypeLast; ++t)
        CHECK(header_error(raw_header(t, 0)) == "(accepted)");
    CHECK(header_error(raw_header(56, 0)) == "urgent channel: unknown message type 56");
    for (unsigned t = proto::kRecoverTypeFirst; t <= proto::kRecoverTypeLast; ++t)
        CHECK(header_error(raw_header(t, 0)) == "(accepted)");
    CHECK(header_error(raw_header(69 - 2, 0)) == "urgent channel: unknown message type 67");
    CHECK(header_error(raw_header(proto::kRecoverTypeLast + 1, 0)) == "urgent channel: unknown message type 73");
    CHECK(header_error(raw_header(79, 0)) == "urgent channel: unknown message type 79");
    for (unsigned t = proto::kEpochTypeFirst; t <= proto::kEpochTypeLast; ++t)
        CHECK(header_error(raw_header(t, 0)) == "(accepted)");
    CHECK(header_error(raw_header(86, 0)) == "urgent channel: unknown message type 86");
    // EPOCH_PAGES is held to the PAGES limit, EPOCH_DEVICE to the device-state limit.
    CHECK(header_error(raw_header(81, proto::kMaxPagesPayload + 1)) ==
          "urgent channel: EPOCH_PAGES frame of 67108865 bytes exceeds the limit of 67108864");
    CHECK(header_error(raw_header(82, proto::kMaxDeviceState + 1)) ==
          "urgent channel: EPOCH_DEVICE frame of 268435457 bytes exceeds the limit of 268435456");
}

TEST_CASE("protocol/rejects-reserved-bits") {
    CHECK(header_error(raw_header(1, 16, 1)) ==
          "urgent channel: HELLO frame has reserved bits set (flags 0x1, reserved 0x0)");
    CHECK(header_error(raw_header(9, 16, 0x80)) ==
          "urgent channel: PAGES frame has reserved bits set (flags 0x80, reserved 0x0)");
    CHECK(header_error(raw_header(1, 16, 0, 0x100)) ==
          "urgent channel: HELLO frame has reserved bits set (flags 0x0, reserved 0x100)");
}

TEST_CASE("protocol/rejects-oversize-length") {
    const std::uint32_t control = proto::kMaxControlPayload, device = proto::kMaxDeviceState,
                        pages = proto::kMaxPagesPayload;
    CHECK(header_error(raw_header(1, control)) == "(accepted)");
    CHECK(header_error(raw_header(1, control + 1)) ==
          "urgent channel: HELLO frame of 1048577 bytes exceeds the limit of 1048576");
    CHECK(header_error(raw_header(3, 0xffffffffu)) ==
          "urgent channel: ERROR frame of 4294967295 bytes exceeds the limit of 1048576");
    CHECK(header_error(raw_header(6, device)) == "(accepted)");
    CHECK(header_error(raw_header(6, device + 1)) ==
          "urgent channel: DEVICE_STATE frame of 268435457 bytes exceeds the limit of 268435456");
    CHECK(header_error(raw_header(9, pages)) == "(accepted)");
    CHECK(header_error(raw_header(9, pages + 1)) ==
          "urgent channel: PAGES frame of 67108865 bytes exceeds the limit of 67108864");
}

TEST_CASE("protocol/checksum-detects-every-single-bit-flip") {
    const auto good = proto::encode(proto::PageRequest{.region = 1, .count = 2, .first = 3});
    const auto h = parse_verified(good, proto::Type::page_request);
    for (std::size_t i = 0; i < good.size(); ++i) {
        if (i >= 12 && i < 16) continue;  // the checksum field itself
        for (int bit = 0; bit < 8; ++bit) {
            auto f = good;
            f[i] ^= b(1u << bit);
            CAPTURE(i);
            CAPTURE(bit);
            CHECK(proto::frame_checksum(head_of(f), payload_of(f)) != h.checksum);
        }
    }
}

TEST_CASE("protocol/hello-from-another-version") {
    auto f = proto::encode(proto::Hello{.version = 7, .channel = proto::Channel::urgent, .mode = Mode::postcopy});
    auto r = proto::decode_hello(payload_of(f));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().message() == "peer speaks protocol version 7, this side speaks 3");
    CHECK(r.error().kind == lazymig::ErrorClass::peer_violation);
    // The version alone decides: a peer of another version may lay out the rest differently.
    auto only = proto::decode_hello(payload_of(f).first(4));
    REQUIRE_FALSE(only.has_value());
    CHECK(only.error().message() == "peer speaks protocol version 7, this side speaks 3");
    auto ack = proto::decode_hello_ack(payload_of(proto::encode(proto::HelloAck{.version = 1})));
    REQUIRE_FALSE(ack.has_value());
    CHECK(ack.error().message() == "peer speaks protocol version 1, this side speaks 3");
}

TEST_CASE("protocol/hello-rejects-invalid-fields") {
    auto payload = [](unsigned channel, unsigned mode, unsigned index = 0, unsigned count = 1) {
        auto f = proto::encode(proto::Hello{.channel = proto::Channel::urgent, .mode = Mode::postcopy, .session = 1});
        f[16 + 4] = b(channel);
        f[16 + 5] = b(mode);
        f[16 + 6] = b(index);
        f[16 + 7] = b(count);
        return std::vector<std::byte>(f.begin() + 16, f.end());
    };
    auto msg = [](const lazymig::Result<proto::Hello>& r) { return err_of(r); };
    CHECK(msg(proto::decode_hello(payload(0, 1))) == "HELLO: unknown channel 0");
    CHECK(msg(proto::decode_hello(payload(4, 1))) == "HELLO: unknown channel 4");
    CHECK(msg(proto::decode_hello(payload(3, 3, 1, 3))) == "HELLO: replication channel with index 1 (expected 0)");
    CHECK(msg(proto::decode_hello(payload(1, 0))) == "HELLO: unknown mode 0");
    CHECK(msg(proto::decode_hello(payload(2, 4))) == "HELLO: unknown mode 4");
    CHECK(msg(proto::decode_hello(payload(1, 1, 0, 0))) == "HELLO: 0 bulk channels (expected 1 to 16)");
    CHECK(msg(proto::decode_hello(payload(2, 1, 0, 17))) == "HELLO: 17 bulk channels (expected 1 to 16)");
    CHECK(msg(proto::decode_hello(payload(1, 1, 1, 3))) == "HELLO: urgent channel with index 1 (expected 0)");
    CHECK(msg(proto::decode_hello(payload(2, 1, 3, 3))) == "HELLO: bulk channel index 3 of 3");
    auto ok = proto::decode_hello(payload(2, 1, 2, 3));
    REQUIRE_MESSAGE(ok.has_value(), err_of(ok));
    CHECK(ok->index == 2);
    CHECK(ok->bulk_channels == 3);
}

TEST_CASE("protocol/decoders-reject-truncated-payloads") {
    SUBCASE("HELLO") {
        const auto f = proto::encode(proto::Hello{.channel = proto::Channel::bulk, .mode = Mode::postcopy});
        check_truncations("HELLO", payload_of(f), {{0, 4}, {4, 1}, {5, 1}, {6, 1}, {7, 1}, {8, 8}},
                          [](auto p) { return proto::decode_hello(p); });
    }
    SUBCASE("HELLO_ACK") {
        const auto f = proto::encode(proto::HelloAck{});
        check_truncations("HELLO_ACK", payload_of(f), {{0, 4}}, [](auto p) { return proto::decode_hello_ack(p); });
    }
    SUBCASE("ERROR") {
        const auto f = proto::encode(proto::ErrorMsg{.code = 5, .text = "broken"});
        check_truncations("ERROR", payload_of(f), {{0, 4}, {4, 4}, {8, 6}},
                          [](auto p) { return proto::decode_error(p); });
    }
    SUBCASE("REGION_TABLE") {
        proto::RegionTable t;
        t.regions.push_back({"ram0", 1u << 20, 4096, Backing::anon});
        t.regions.push_back({"r1", 2u << 20, 4096, Backing::memfd});
        const auto f = proto::encode(t);
        // count | per region: name length, name, size, page size, backing
        check_truncations("REGION_TABLE", payload_of(f),
                          {{0, 4}, {4, 4}, {8, 4}, {12, 8}, {20, 4}, {24, 1},
                           {25, 4}, {29, 2}, {31, 8}, {39, 4}, {43, 1}},
                          [](auto p) { return proto::decode_region_table(p); });
    }
    SUBCASE("PAGE_REQUEST") {
        const auto f = proto::encode(proto::PageRequest{.region = 0, .count = 1, .first = 9});
        check_truncations("PAGE_REQUEST", payload_of(f), {{0, 4}, {4, 4}, {8, 8}},
                          [](auto p) { return proto::decode_page_request(p); });
    }
}

TEST_CASE("protocol/decoders-reject-out-of-range-values") {
    proto::RegionTable none;
    CHECK(err_of(proto::decode_region_table(payload_of(proto::encode(none)))) ==
          "REGION_TABLE: 0 regions (expected 1 to 64)");
    proto::RegionTable many;
    for (int i = 0; i < 65; ++i) many.regions.push_back({fmt::format("r{}", i), 4096, 4096, Backing::anon});
    CHECK(err_of(proto::decode_region_table(payload_of(proto::encode(many)))) ==
          "REGION_TABLE: 65 regions (expected 1 to 64)");
    proto::RegionTable bad_backing;
    bad_backing.regions.push_back({"ram0", 4096, 4096, Backing::anon});
    auto raw = proto::encode(bad_backing);
    std::vector<std::byte> bad(raw.begin() + proto::kHeaderSize, raw.end());
    bad[24] = b(4);  // count 4 | name 4+4 | size 8 | page size 4 | backing
    CHECK(err_of(proto::decode_region_table(bad)) == "REGION_TABLE: region 0 'ram0' has unknown backing 4");
    // A public enum value the wire does not know is never cast onto the wire as it is.
    proto::RegionTable unknown;
    unknown.regions.push_back({"ram0", 4096, 4096, Backing{9}});
    CHECK(err_of(proto::decode_region_table(payload_of(proto::encode(unknown)))) ==
          "REGION_TABLE: region 0 'ram0' has unknown backing 0");
    proto::RegionTable long_name;
    long_name.regions.push_back({std::string(256, 'n'), 4096, 4096, Backing::anon});
    CHECK(err_of(proto::decode_region_table(payload_of(proto::encode(long_name)))) ==
          "REGION_TABLE: string of 256 bytes at offset 4 exceeds 255");
    CHECK(err_of(proto::decode_error(payload_of(proto::encode(proto::ErrorMsg{1, std::string(4097, 'e')})))) ==
          "ERROR: string of 4097 bytes at offset 4 exceeds 4096");
    CHECK(err_of(proto::decode_page_request(payload_of(proto::encode(proto::PageRequest{0, 0, 0})))) ==
          "PAGE_REQUEST: count 0 (expected 1 to 1024)");
    CHECK(err_of(proto::decode_page_request(payload_of(proto::encode(proto::PageRequest{0, 1025, 0})))) ==
          "PAGE_REQUEST: count 1025 (expected 1 to 1024)");
}

TEST_CASE("protocol/region-table-mismatch-names-the-difference") {
    std::vector<lazymig::GuestRegion> ours = {
        {.name = "ram0", .host = nullptr, .size = 8u << 20, .page_size = 4096, .backing = Backing::anon},
        {.name = "ram1", .host = nullptr, .size = 4u << 20, .page_size = 4096, .backing = Backing::memfd},
    };
    auto table = [&] { return proto::region_table_of(ours); };
    CHECK(proto::check_region_table(table(), ours).has_value());

    auto fewer = table();
    fewer.regions.pop_back();
    CHECK(err_of(proto::check_region_table(fewer, ours)) ==
          "region table mismatch: the source has 1 regions, this side 2");
    auto renamed = table();
    renamed.regions[1].name = "rom";
    CHECK(err_of(proto::check_region_table(renamed, ours)) ==
          "region table mismatch: region 1 is 'ram1' here, 'rom' at the source");
    auto smaller = table();
    smaller.regions[0].size = 4u << 20;
    CHECK(err_of(proto::check_region_table(smaller, ours)) ==
          "region table mismatch: region 0 'ram0': size 8388608 here, 4194304 at the source");
    auto huge = table();
    huge.regions[1].page_size = 2u << 20;
    CHECK(err_of(proto::check_region_table(huge, ours)) ==
          "region table mismatch: region 1 'ram1': page size 4096 here, 2097152 at the source");
}

// FrameReader over a socketpair: the checks a receiver applies to whole frames.
namespace {

struct Pipe {
    int fds[2] = {-1, -1};
    lazymig::net::ShutdownEvent stop;
    std::unique_ptr<lazymig::net::Channel> channel;
    Pipe() {
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
        auto s = lazymig::net::ShutdownEvent::create();
        REQUIRE_MESSAGE(s.has_value(), err_of(s));
        stop = std::move(*s);
        auto c = lazymig::net::stream_channel(lazymig::net::Fd(fds[1]), "test channel", stop.fd());
        fds[1] = -1;
        REQUIRE_MESSAGE(c.has_value(), err_of(c));
        channel = std::move(*c);
    }
    ~Pipe() {
        for (int fd : fds)
            if (fd >= 0) ::close(fd);
    }
    void send(std::span<const std::byte> bytes) {
        REQUIRE(::send(fds[0], bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
    }
    void close_writer() {
        ::close(fds[0]);
        fds[0] = -1;
    }
};

}  // namespace

TEST_CASE("frames/refuses-wrong-checksum") {
    Pipe p;
    lazymig::net::FrameReader reader(*p.channel);
    const auto good = proto::encode(proto::HelloAck{});
    const auto sent = parse_verified(good, proto::Type::hello_ack).checksum;
    auto bad_payload = good;
    bad_payload[16] ^= b(0x10);
    auto bad_sum = good;
    bad_sum[12] ^= b(0x01);
    p.send(bad_payload);
    auto r = reader.expect(proto::Type::hello_ack);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().message() ==
          fmt::format("test channel: HELLO_ACK frame checksum mismatch (got {:#010x}, computed {:#010x})", sent,
                      proto::frame_checksum(head_of(bad_payload), payload_of(bad_payload))));
    p.send(bad_sum);
    r = reader.expect(proto::Type::hello_ack);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().message() ==
          fmt::format("test channel: HELLO_ACK frame checksum mismatch (got {:#010x}, computed {:#010x})", sent ^ 1,
                      sent));
    p.send(good);
    r = reader.expect(proto::Type::hello_ack);
    CHECK_MESSAGE(r.has_value(), err_of(r));
}

TEST_CASE("frames/peer-error-and-wrong-type") {
    Pipe p;
    lazymig::net::FrameReader reader(*p.channel);
    p.send(proto::encode(proto::ErrorMsg{0, "region table mismatch: region 0"}));
    p.send(proto::encode_empty(proto::Type::resumed));
    auto r = reader.expect(proto::Type::hello_ack);
    CHECK(err_of(r) == "test channel: peer reported: region table mismatch: region 0");
    r = reader.expect(proto::Type::hello_ack);
    CHECK(err_of(r) == "test channel: expected HELLO_ACK, got RESUMED");
    CHECK(r.error().kind == lazymig::ErrorClass::peer_violation);
    p.close_writer();
    r = reader.expect(proto::Type::hello_ack);
    CHECK(err_of(r) == "test channel: peer closed the connection while HELLO_ACK was expected");
}

TEST_CASE("frames/refuses-truncated-header") {
    Pipe p;
    lazymig::net::FrameReader reader(*p.channel);
    const auto f = proto::encode(proto::HelloAck{});
    p.send(std::span(f).first(8));
    p.close_writer();
    auto r = reader.expect(proto::Type::hello_ack);
    CHECK(err_of(r) == "test channel: truncated frame: the peer closed the connection inside a frame header");
    CHECK(r.error().kind == lazymig::ErrorClass::transport_lost);
}

TEST_CASE("frames/refuses-truncated-payload") {
    Pipe p;
    lazymig::net::FrameReader reader(*p.channel);
    const auto f = proto::encode(proto::ErrorMsg{0, "half of this text never arrives"});
    p.send(std::span(f).first(f.size() - 10));
    p.close_writer();
    auto r = reader.expect(proto::Type::hello_ack);
    CHECK(err_of(r) == "test channel: truncated ERROR frame: the peer closed the connection inside it");
    CHECK(r.error().kind == lazymig::ErrorClass::transport_lost);
}
