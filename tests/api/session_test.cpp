// The session's contract with its VMM: error classes all the way to the C ABI, and
// hooks that must not wait for the thread they run on.
#include <doctest/doctest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <string>

#include "lazymig/lazymig.h"
#include "lazymig/lazymig.hpp"
#include "src/net/socket.hpp"
#include "tests/tls_key.hpp"

using namespace lazymig;

namespace {

VmmHooks hooks() {
    return VmmHooks{.pause_vcpus = [] {}, .resume_vcpus = [] {},
                    .save_device_state = []() -> Result<std::vector<std::byte>> { return std::vector<std::byte>(8); },
                    .load_device_state = [](std::span<const std::byte>) -> Result<void> { return {}; }};
}

// A port nothing listens on: bound, never listened, closed at the end of the test.
struct DeadPort {
    net::Fd fd;
    std::string uri;
    DeadPort() {
        auto at = net::parse_uri("tcp:127.0.0.1:0");
        REQUIRE(at);
        fd = net::Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        REQUIRE(fd.valid());
        sockaddr_in a{.sin_family = AF_INET, .sin_port = 0, .sin_addr = {htonl(INADDR_LOOPBACK)}, .sin_zero = {}};
        REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
        auto local = net::local_endpoint(fd.get());
        REQUIRE(local);
        uri = local->uri();
    }
};

}  // namespace

TEST_CASE("api/session/refused-connection-is-transport-lost-in-the-c-abi") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    REQUIRE(mem);
    DeadPort dead;
    lazymig_region region{"ram0", mem->data(), mem->size(), 4096, LAZYMIG_BACKING_ANON, -1, 0};
    lazymig_hooks h{};
    h.pause_vcpus = [](void*) {};
    h.resume_vcpus = [](void*) {};
    h.save_device_state = [](void*, void** buf, size_t* len) {
        *buf = nullptr;
        *len = 0;
        return 0;
    };
    lazymig_source* src = nullptr;
    // Authentication is on unless chosen off: without a key the source is refused.
    CHECK(lazymig_source_create(&region, 1, &h, dead.uri.c_str(), LAZYMIG_MODE_POSTCOPY, &src) == -EINVAL);
    CHECK(std::string(lazymig_last_error()) ==
          "source: TLS: authentication is on and no key was given: set a pre-shared key (psk or psk_file), "
          "x509 credentials, or choose auth=none explicitly");
    REQUIRE(lazymig_source_create_auth(&region, 1, &h, dead.uri.c_str(), LAZYMIG_MODE_POSTCOPY, "none", &src) == 0);
    REQUIRE(lazymig_source_migrate(src) == 0);
    CHECK(lazymig_source_wait(src) == -ECONNREFUSED);
    CHECK(lazymig_last_error_class() == LAZYMIG_ERROR_TRANSPORT_LOST);
    CHECK(std::string(lazymig_last_error()) ==
          "source: urgent channel: connecting to " + dead.uri + ": Connection refused (errno 111)");
    lazymig_source_destroy(src);
}

TEST_CASE("api/session/region-mismatch-is-a-peer-violation-on-both-sides") {
    auto small = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    auto large = GuestMemory::create("ram0", 2 << 20, Backing::anon, false);
    REQUIRE(small);
    REQUIRE(large);
    auto dst = Destination::listen({.regions = {large->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:0",
                                    .security = testkey::security()});
    REQUIRE(dst);
    auto src = Source::create({.regions = {small->region()}, .hooks = hooks(), .uri = (*dst)->local_uri(),
                               .parameters = {.bulk_channels = 2}, .security = testkey::security()});
    REQUIRE(src);
    REQUIRE((*src)->migrate());
    auto s = (*src)->wait();
    auto d = (*dst)->wait();
    REQUIRE_FALSE(s);
    REQUIRE_FALSE(d);
    CHECK(d.error().kind == ErrorClass::peer_violation);
    CHECK(d.error().message() == "region table mismatch: region 0 'ram0': size 2097152 here, 1048576 at the source");
    CHECK(s.error().kind == ErrorClass::peer_violation);
    CHECK(s.error().message() == "urgent channel to " + (*dst)->local_uri() +
                                     ": peer reported: region table mismatch: region 0 'ram0': size 2097152 here, "
                                     "1048576 at the source");
    CHECK((*dst)->stats().bulk_channels == 2);
}

TEST_CASE("api/session/hooks-may-not-wait-on-their-own-migration") {
    auto src_mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    auto dst_mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, false);
    REQUIRE(src_mem);
    REQUIRE(dst_mem);
    auto dst = Destination::listen({.regions = {dst_mem->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:0",
                                    .security = testkey::security()});
    REQUIRE(dst);
    Source* self = nullptr;
    std::string from_hook;
    std::atomic<int> resumed{0};
    auto h = hooks();
    // The VMM's pause hook waits on, then cancels, the migration that called it: wait()
    // is refused (it would join the thread it runs on) and cancel() only asks the stop.
    h.pause_vcpus = [&] {
        auto w = self->wait();
        from_hook = w ? "(waited)" : w.error().message();
        self->cancel();
    };
    h.resume_vcpus = [&] { ++resumed; };
    auto src = Source::create({.regions = {src_mem->region()}, .hooks = h, .uri = (*dst)->local_uri(),
                               .security = testkey::security()});
    REQUIRE(src);
    self = src->get();
    REQUIRE((*src)->migrate());
    auto r = (*src)->wait();
    CHECK(from_hook == "source: wait() called from a hook on the migration's own thread: Resource deadlock avoided "
                       "(errno 35)");
    REQUIRE_FALSE(r);
    CHECK(r.error().message() == "source: migration cancelled: Operation canceled (errno 125)");
    CHECK((*src)->stats().phase == Phase::cancelled);
    CHECK(resumed == 1);  // cancelled before the destination resumed: the VM runs here again
    (*dst)->cancel();
}
