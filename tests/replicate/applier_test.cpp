// The source's epoch applier against a hand-written destination over a socketpair: an
// epoch is applied only whole and checksummed; a corrupt or partial one never is.
#include <doctest/doctest.h>
#include <sys/socket.h>

#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "precopy/epoch_applier.hpp"
#include "src/crc32c.hpp"
#include "src/net/channel.hpp"
#include "src/net/frames.hpp"
#include "src/net/socket.hpp"
#include "src/protocol.hpp"

namespace {

using namespace lazymig;
constexpr std::size_t kPage = 4096;
constexpr std::size_t kPages = 64;

struct Link {
    net::ShutdownEvent stop = *net::ShutdownEvent::create();
    std::unique_ptr<net::Channel> source, destination;
    Link() {
        int sv[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        source = *net::stream_channel(net::Fd(sv[0]), "replication channel", stop.fd());
        destination = *net::stream_channel(net::Fd(sv[1]), "destination end", stop.fd());
    }
};

// An EPOCH_PAGES frame of `count` pages from `first`, each filled with `fill`.
struct PagesFrame {
    std::vector<std::byte> head, data;
    std::uint32_t checksum = 0;
    PagesFrame(std::uint64_t first, std::uint32_t count, std::uint8_t fill) {
        data.assign(std::size_t(count) * kPage, std::byte{fill});
        std::vector<std::uint32_t> crcs(count);
        std::vector<const std::byte*> ptrs(count);
        for (std::uint32_t i = 0; i < count; ++i) ptrs[i] = data.data() + i * kPage;
        crc32c_pages(ptrs.data(), count, kPage, crcs.data());
        proto::PagesMeta meta;
        meta.region = 0;
        meta.count = count;
        meta.first = first;
        head.resize(proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8);
        head.resize(proto::encode_pages_head(head.data(), meta, kPage, crcs, proto::Type::epoch_pages));
        std::memcpy(&checksum, head.data() + 12, 4);
    }
    void send(net::Channel& ch) const {
        const iovec iov[2] = {{const_cast<std::byte*>(head.data()), head.size()},
                              {const_cast<std::byte*>(data.data()), data.size()}};
        REQUIRE(ch.send(iov).has_value());
    }
};

struct Fixture {
    GuestMemory mem = *GuestMemory::create("ram0", kPages * kPage, Backing::memfd, true);
    Link link;
    source::EpochApplier applier{std::vector<GuestRegion>{mem.region()}, std::vector<std::byte>(4, std::byte{1})};
    Result<void> outcome;
    int acks_sent = 0;
    std::thread thread;
    Fixture() {
        thread = std::thread([this] {
            net::FrameReader reader(*link.source);
            outcome = applier.run(reader, [this] { ++acks_sent; });
        });
    }
    ~Fixture() {
        if (thread.joinable()) finish();
    }
    void finish() {
        link.destination.reset();  // EOF
        thread.join();
    }
    [[nodiscard]] std::uint64_t pages_filled_with(std::uint8_t v) const {
        std::uint64_t n = 0;
        for (std::size_t p = 0; p < kPages; ++p) {
            bool all = true;
            for (std::size_t i = 0; i < kPage; ++i) all &= mem.data()[p * kPage + i] == std::byte{v};
            n += all;
        }
        return n;
    }
    // A whole epoch: pages [first, first+count) filled with `fill`, device state `dev`.
    void send_epoch(std::uint64_t n, std::uint64_t first, std::uint32_t count, std::uint8_t fill,
                    std::vector<std::byte> dev, bool corrupt = false, bool end = true) {
        auto& ch = *link.destination;
        REQUIRE(net::send_frame(ch, proto::encode(proto::EpochBegin{n, count, dev.size()})).has_value());
        PagesFrame f(first, count, fill);
        if (corrupt) f.data[kPage + 17] ^= std::byte{1};  // one bit of the second page
        f.send(ch);
        const auto d = proto::encode_epoch_device(dev);
        std::uint32_t dsum;
        std::memcpy(&dsum, d.data() + 12, 4);
        REQUIRE(net::send_frame(ch, d).has_value());
        if (!end) return;
        const std::uint32_t sum = proto::epoch_fold(proto::epoch_fold(0, f.checksum), dsum);
        REQUIRE(net::send_frame(ch, proto::encode(proto::EpochEnd{n, 2, sum})).has_value());
    }
    std::uint64_t read_ack() {
        net::FrameReader r(*link.destination);
        auto raw = r.expect(proto::Type::epoch_ack);
        REQUIRE_MESSAGE(raw.has_value(), raw.error().message());
        auto a = proto::decode_epoch_ack(*raw);
        REQUIRE(a.has_value());
        return a->epoch;
    }
};

}  // namespace

TEST_CASE("replicate/applier-applies-whole-epochs-and-acks") {
    Fixture f;
    f.send_epoch(1, 8, 16, 0xA1, {std::byte{7}, std::byte{7}});
    CHECK(f.read_ack() == 1);
    f.send_epoch(2, 20, 8, 0xB2, {std::byte{9}});
    CHECK(f.read_ack() == 2);
    f.finish();
    CHECK_MESSAGE(f.outcome.has_value(), f.outcome.error().message());
    CHECK(f.applier.committed() == 2);
    CHECK(f.acks_sent == 2);
    CHECK(f.pages_filled_with(0xA1) == 12);  // 8..19; 20..23 overwritten by epoch 2
    CHECK(f.pages_filled_with(0xB2) == 8);
    CHECK(f.applier.checkpoint() == std::vector<std::byte>{std::byte{9}});
}

TEST_CASE("replicate/applier-refuses-a-corrupt-epoch") {
    Fixture f;
    f.send_epoch(1, 0, 4, 0xC3, {std::byte{5}});
    CHECK(f.read_ack() == 1);
    f.send_epoch(2, 10, 4, 0xD4, {std::byte{6}}, /*corrupt=*/true);
    f.thread.join();
    REQUIRE_FALSE(f.outcome.has_value());
    CHECK(f.outcome.error().kind == ErrorClass::peer_violation);
    const std::string msg = f.outcome.error().message();
    CHECK_MESSAGE(msg.find("replication channel: EPOCH_PAGES checksum mismatch for region 0 pages 10..13") == 0, msg);
    CHECK_MESSAGE(msg.find("the epoch is refused and none of it applied") != std::string::npos, msg);
    CHECK(f.applier.committed() == 1);
    CHECK(f.pages_filled_with(0xC3) == 4);
    CHECK(f.pages_filled_with(0xD4) == 0);  // nothing of epoch 2 reached guest RAM
    CHECK(f.applier.checkpoint() == std::vector<std::byte>{std::byte{5}});
}

TEST_CASE("replicate/applier-discards-an-epoch-cut-by-link-loss") {
    Fixture f;
    f.send_epoch(1, 0, 4, 0xE5, {std::byte{1}}, false, /*end=*/false);
    f.finish();
    REQUIRE_FALSE(f.outcome.has_value());
    CHECK(f.outcome.error().kind == ErrorClass::transport_lost);
    const std::string msg = f.outcome.error().message();
    CHECK_MESSAGE(msg == "replication channel: the destination closed the connection; epoch 1 was not whole and is "
                         "discarded: Connection reset by peer (errno 104)", msg);
    CHECK(f.applier.committed() == 0);
    CHECK(f.pages_filled_with(0xE5) == 0);
    CHECK(f.applier.checkpoint() == std::vector<std::byte>(4, std::byte{1}));  // still the switchover's
}

TEST_CASE("replicate/applier-refuses-an-end-that-does-not-match") {
    Fixture f;
    auto& ch = *f.link.destination;
    REQUIRE(net::send_frame(ch, proto::encode(proto::EpochBegin{1, 2, 0})).has_value());
    PagesFrame(0, 2, 0xF6).send(ch);
    REQUIRE(net::send_frame(ch, proto::encode_epoch_device({})).has_value());
    REQUIRE(net::send_frame(ch, proto::encode(proto::EpochEnd{1, 2, 0x1234})).has_value());  // wrong checksum
    f.thread.join();
    REQUIRE_FALSE(f.outcome.has_value());
    CHECK(f.outcome.error().kind == ErrorClass::peer_violation);
    CHECK_MESSAGE(f.outcome.error().message().find("EPOCH_END 1 does not close epoch 1 as received") != std::string::npos,
                  f.outcome.error().message());
    CHECK(f.pages_filled_with(0xF6) == 0);
    CHECK(f.applier.committed() == 0);
}
