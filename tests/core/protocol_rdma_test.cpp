// The RDMA set-up frames (types 60..66): round trips and the peer's lies refused.
#include <doctest/doctest.h>

#include "src/net/rdma.hpp"
#include "tests/core/frame_util.hpp"

using namespace core_test;

TEST_CASE("protocol/rdma/roundtrip") {
    const proto::RdmaRegions in{{{0x7f0000001000ull, 1ull << 30, 0x1234}, {0x7f1000000000ull, 4096, 7}}, true};
    const auto f = proto::encode(in);
    parse_verified(f, proto::Type::rdma_regions);
    auto out = proto::decode_rdma_regions(payload_of(f));
    REQUIRE_MESSAGE(out.has_value(), err_of(out));
    REQUIRE(out->regions.size() == 2);
    CHECK(out->regions[0].addr == 0x7f0000001000ull);
    CHECK(out->regions[0].length == 1ull << 30);
    CHECK(out->regions[1].rkey == 7);
    CHECK(out->on_demand);

    const auto l = proto::encode(proto::RdmaListen{4791});
    parse_verified(l, proto::Type::rdma_listen);
    CHECK(proto::decode_rdma_listen(payload_of(l))->port == 4791);

    const proto::ZeroBitmap z{3, 1024, 20, {0xff, 0x01, 0x0f}};
    const auto zf = proto::encode(z);
    parse_verified(zf, proto::Type::zero_bitmap);
    auto zo = proto::decode_zero_bitmap(payload_of(zf));
    REQUIRE_MESSAGE(zo.has_value(), err_of(zo));
    CHECK(zo->region == 3);
    CHECK(zo->first == 1024);
    CHECK(zo->bits == z.bits);

    const proto::SampleCrcs s{1, {{0, 0xdeadbeef}, {64, 42}}};
    const auto sf = proto::encode(s);
    parse_verified(sf, proto::Type::sample_crcs);
    auto so = proto::decode_sample_crcs(payload_of(sf));
    REQUIRE_MESSAGE(so.has_value(), err_of(so));
    REQUIRE(so->samples.size() == 2);
    CHECK(so->samples[0].crc == 0xdeadbeef);
    CHECK(so->samples[1].page == 64);

    for (auto t : {proto::Type::rdma_offer, proto::Type::rdma_ready, proto::Type::scan_done})
        parse_verified(proto::encode_empty(t), t);
}

TEST_CASE("protocol/rdma/rejects") {
    // A region whose end wraps around 2^64.
    auto f = proto::encode(proto::RdmaRegions{{{~0ull - 10, 4096, 1}}, false});
    auto r = proto::decode_rdma_regions(payload_of(f));
    REQUIRE(!r);
    CHECK(r.error().context == "RDMA_REGIONS: region 0 at 0xfffffffffffffff5 + 4096 wraps");
    CHECK(r.error().kind == lazymig::ErrorClass::peer_violation);
    // A bitmap shorter than its page count.
    f = proto::encode(proto::ZeroBitmap{0, 0, 100, {0, 0}});
    auto z = proto::decode_zero_bitmap(payload_of(f));
    REQUIRE(!z);
    CHECK(z.error().context == "ZERO_BITMAP: 100 pages need 13 bitmap bytes, the frame has 2");
    // Port 0 cannot be connected to.
    f = proto::encode(proto::RdmaListen{0});
    CHECK(proto::decode_rdma_listen(payload_of(f)).error().context == "RDMA_LISTEN: port 0");
    // A type between the TCP ones and the RDMA range is still unknown.
    auto raw = proto::encode_empty(proto::Type::rdma_offer);
    raw[4] = std::byte{59};
    auto h = proto::parse_header(head_of(raw), "urgent channel");
    REQUIRE(!h);
    CHECK(h.error().context == "urgent channel: unknown message type 59");
}

TEST_CASE("rdma/uri") {
    CHECK(lazymig::net::is_rdma_uri("rdma:192.0.2.1:0"));
    CHECK(!lazymig::net::is_rdma_uri("tcp:192.0.2.1:0"));
    CHECK(*lazymig::net::rdma_host("rdma:192.0.2.1:4444") == "192.0.2.1");
    CHECK(lazymig::net::rdma_host("rdma:192.0.2.1").error().context == "uri 'rdma:192.0.2.1': missing :PORT");
    // The connect request's private data names the role and the session, little-endian.
    const auto p = lazymig::net::rdma::private_data(lazymig::net::rdma::Role::bulk, 0x0102030405060708ull);
    CHECK(p[0] == std::byte{'L'});
    CHECK(p[4] == std::byte{2});
    CHECK(p[5] == std::byte{8});
    CHECK(p[12] == std::byte{1});
}
