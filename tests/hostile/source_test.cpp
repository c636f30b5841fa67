// A hostile destination against a real Source: refused with both versions named, and
// a destination that vanishes mid-handshake ends the migration with the VM still here.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include "tests/hostile/target.hpp"

using namespace hostile;

namespace {

// A listening socket on 127.0.0.1, a port picked by the kernel, and a real Source
// pointed at it.
class HostileDestination {
public:
    HostileDestination() : calls_(std::make_shared<Calls>()) {
        auto l = lazymig::net::listen_tcp({"127.0.0.1", 0});
        REQUIRE_MESSAGE(l.has_value(), err_of(l));
        listener_ = std::move(*l);
        auto ep = lazymig::net::local_endpoint(listener_.get());
        REQUIRE_MESSAGE(ep.has_value(), err_of(ep));
        uri_ = ep->uri();
        auto m = lazymig::GuestMemory::create("ram0", kSize, Backing::anon, true);
        REQUIRE_MESSAGE(m.has_value(), err_of(m));
        mem_ = std::move(*m);
        std::memset(mem_.data(), 0x5a, kSize);
        auto c = calls_;
        lazymig::VmmHooks hooks{
            .pause_vcpus = [c] { ++c->pause; },
            .resume_vcpus = [c] { ++c->resume; },
            .save_device_state = [c]() -> lazymig::Result<std::vector<std::byte>> {
                ++c->load;  // counts saves on this side
                return std::vector<std::byte>(100, std::byte{1});
            },
            .load_device_state = {},
            .on_epoch_committed = {},
            .on_event = {},
        };
        auto s = lazymig::Source::create({.regions = {mem_.region()}, .hooks = hooks, .uri = uri_,
                                          .mode = lazymig::Mode::postcopy, .parameters = {.bulk_channels = 1},
                                          .connect_timeout = std::chrono::milliseconds(kTimeoutMs),
                                          .security = testkey::security()});
        REQUIRE_MESSAGE(s.has_value(), err_of(s));
        src_ = std::move(*s);
        auto started = src_->migrate();
        REQUIRE_MESSAGE(started.has_value(), err_of(started));
    }

    // Accepts the next channel and checks its HELLO.
    Conn accept_hello(proto::Channel want) {
        Conn c = Conn::accept_from(listener_.get());
        auto f = c.expect(proto::Type::hello);
        auto h = proto::decode_hello(f.payload);
        REQUIRE_MESSAGE(h.has_value(), err_of(h));
        CHECK(h->version == proto::kVersion);
        CHECK(h->channel == want);
        return c;
    }

    std::string failure() {
        auto r = bounded_wait(*src_);
        REQUIRE_MESSAGE(!r.has_value(), "the source accepted what it should have refused");
        CHECK(src_->stats().phase == lazymig::Phase::failed);
        return r.error().message();
    }

    static constexpr std::size_t kSize = 1u << 20;
    Calls& calls() { return *calls_; }
    const std::string& uri() const { return uri_; }

private:
    std::shared_ptr<Calls> calls_;
    lazymig::net::Fd listener_;
    std::string uri_;
    lazymig::GuestMemory mem_;
    std::unique_ptr<lazymig::Source> src_;
};

}  // namespace

TEST_CASE("hostile/destination-speaks-another-version") {
    HostileDestination d;
    Conn urgent = d.accept_hello(proto::Channel::urgent);
    urgent.send(proto::encode(proto::HelloAck{.version = 1}));
    CHECK(d.failure() ==
          fmt::format("urgent channel to {}: peer speaks protocol version 1, this side speaks 3", d.uri()));
    CHECK(d.calls().pause == 0);
    CHECK(d.calls().resume == 0);
}

TEST_CASE("hostile/destination-closes-after-hello") {
    HostileDestination d;
    Conn urgent = d.accept_hello(proto::Channel::urgent);
    urgent.close();
    CHECK(d.failure() == fmt::format("urgent channel to {}: peer closed the connection while HELLO_ACK was expected",
                                     d.uri()));
    CHECK(d.calls().pause == 0);
    CHECK(d.calls().resume == 0);
}

TEST_CASE("hostile/destination-reports-an-error") {
    HostileDestination d;
    Conn urgent = d.accept_hello(proto::Channel::urgent);
    urgent.send(proto::encode(proto::ErrorMsg{0, "no room for this VM"}));
    CHECK(d.failure() == fmt::format("urgent channel to {}: peer reported: no room for this VM", d.uri()));
    CHECK(d.calls().pause == 0);
}

TEST_CASE("hostile/destination-requests-a-page-out-of-range") {
    HostileDestination d;
    Conn urgent = d.accept_hello(proto::Channel::urgent);
    urgent.send(proto::encode(proto::HelloAck{}));
    Conn bulk = d.accept_hello(proto::Channel::bulk);
    bulk.send(proto::encode(proto::HelloAck{}));
    urgent.expect(proto::Type::region_table);
    urgent.send(proto::encode_empty(proto::Type::region_ack));
    urgent.expect(proto::Type::device_state);
    urgent.send(proto::encode_empty(proto::Type::device_loaded));
    urgent.expect(proto::Type::go);
    urgent.send(proto::encode_empty(proto::Type::resumed));
    const std::uint64_t pages = HostileDestination::kSize / kPage;
    urgent.send(proto::encode(proto::PageRequest{.region = 0, .count = 2, .first = pages - 1}));
    CHECK(d.failure() == fmt::format("urgent channel to {}: PAGE_REQUEST for pages {}..{} of region 0, which has {} "
                                     "pages", d.uri(), pages - 1, pages, pages));
    // Handed over: the VM runs at the destination now and must not run here as well.
    CHECK(d.calls().pause == 1);
    CHECK(d.calls().resume == 0);
}
