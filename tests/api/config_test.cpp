// Bad configuration is refused before anything starts, with a sentence that says what
// and where; nothing is registered, listened on or connected.
#include <doctest/doctest.h>

#include <sys/mman.h>

#include <string>

#include "lazymig/lazymig.h"
#include "lazymig/lazymig.hpp"
#include "tests/tls_key.hpp"

using namespace lazymig;

namespace {

VmmHooks hooks() {
    return VmmHooks{.pause_vcpus = [] {}, .resume_vcpus = [] {},
                    .save_device_state = []() -> Result<std::vector<std::byte>> { return std::vector<std::byte>{}; },
                    .load_device_state = [](std::span<const std::byte>) -> Result<void> { return {}; }};
}

std::string source_error(std::vector<GuestRegion> regions, std::string uri = "tcp:127.0.0.1:4444",
                         VmmHooks h = hooks()) {
    auto s = Source::create({.regions = std::move(regions), .hooks = std::move(h), .uri = std::move(uri),
                             .security = testkey::security()});
    return s ? std::string("(accepted)") : s.error().message();
}

std::string destination_error(std::vector<GuestRegion> regions, std::string uri = "tcp:127.0.0.1:0") {
    auto d = Destination::listen({.regions = std::move(regions), .hooks = hooks(), .uri = std::move(uri),
                                  .security = testkey::security()});
    return d ? std::string("(accepted)") : d.error().message();
}

}  // namespace

TEST_CASE("api/config/regions-refused-with-what-and-where") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, false);
    REQUIRE(mem);
    const GuestRegion good = mem->region();

    CHECK(source_error({}) == "source: no guest regions configured");
    CHECK(destination_error({}) == "destination: no guest regions configured");

    auto r = good;
    r.size = 4096 * 3 + 100;
    CHECK(source_error({r}) == "source region 0 'ram0': size 12388 is not a positive multiple of the page size 4096");
    r = good;
    r.page_size = 3000;
    CHECK(destination_error({r}) ==
          "destination region 0 'ram0': page size 3000 is not a power of two of at least 4096");
    r = good;
    r.host = static_cast<std::byte*>(good.host) + 8;
    CHECK(source_error({r}).ends_with("is not aligned to its page size"));
    r = good;
    r.backing = Backing::memfd;
    CHECK(source_error({r}) == "source region 0 'ram0': memfd backing needs the file descriptor (fd)");
    r = good;
    r.host = nullptr;
    CHECK(source_error({r}) == "source region 0 'ram0': host address is null");
    CHECK(source_error({good, good}) == "source region 1 'ram0': name repeats region 0");
    r = good;
    r.name = "";
    CHECK(source_error({r}) == "source region 0 '': name must be 1 to 255 bytes");
}

TEST_CASE("api/config/uris-and-hooks") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, false);
    REQUIRE(mem);
    CHECK(source_error({mem->region()}, "tcp:127.0.0.1:0") ==
          "source: uri 'tcp:127.0.0.1:0' needs the destination's port");
    CHECK(source_error({mem->region()}, "rdma:10.0.0.1:4444") ==
          "source: uri 'rdma:10.0.0.1:4444': expected tcp:HOST:PORT (other transports: rdma: is not built in)");
    CHECK(source_error({mem->region()}, "tcp:127.0.0.1:4444", VmmHooks{}) ==
          "source: hooks pause_vcpus, resume_vcpus and save_device_state are required");
    CHECK(destination_error({mem->region()}, "tcp:example:1") ==
          "destination: listen: host 'example' is not a numeric IPv4 or IPv6 address");
    // A port already taken: the error names the address and the errno.
    auto first = Destination::listen({.regions = {mem->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:0",
                                      .security = testkey::security()});
    REQUIRE(first);
    auto mem2 = GuestMemory::create("ram0", 1 << 20, Backing::anon, false);
    REQUIRE(mem2);
    const std::string taken = (*first)->local_uri();
    CHECK(destination_error({mem2->region()}, taken) ==
          "destination: bind " + taken + ": Address already in use (errno 98)");
    (*first)->cancel();
}

TEST_CASE("api/config/guest-memory") {
    auto bad = GuestMemory::create("ram0", 4096 * 3 + 1, Backing::anon, false);
    REQUIRE_FALSE(bad);
    CHECK(bad.error().message() ==
          "guest memory 'ram0': size 12289 is not a positive multiple of the page size 4096");
    CHECK(parse_backing("tmpfs").error().message() == "unknown backing 'tmpfs' (expected anon, memfd or hugetlbfs)");
    CHECK(parse_mode("live").error().message() == "unknown mode 'live' (expected postcopy, precopy or hybrid)");
}

TEST_CASE("api/config/c-abi-reports-errno-and-sentence") {
    lazymig_region region{"ram0", nullptr, 4096, 4096, LAZYMIG_BACKING_ANON, -1, 0};
    lazymig_hooks h{};
    lazymig_source* src = nullptr;
    CHECK(lazymig_source_create(&region, 1, &h, "tcp:127.0.0.1:1", LAZYMIG_MODE_POSTCOPY, &src) == -EINVAL);
    CHECK(std::string(lazymig_last_error()) == "source region 0 'ram0': host address is null");
    CHECK(src == nullptr);
    CHECK(lazymig_source_create(nullptr, 1, &h, "tcp:127.0.0.1:1", LAZYMIG_MODE_POSTCOPY, &src) == -EINVAL);
    CHECK(std::string(lazymig_last_error()) == "lazymig_source_create: null argument");
}

TEST_CASE("api/config/unsupported-mode-is-refused-not-downgraded") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    REQUIRE(mem);
    auto s = Source::create({.regions = {mem->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:9",
                             .mode = Mode::hybrid, .security = testkey::security()});
    REQUIRE(s);
    auto m = (*s)->migrate();
    REQUIRE_FALSE(m);
    CHECK(m.error().message() == "source: mode hybrid is not available yet; this build migrates postcopy");
    CHECK((*s)->stats().phase == Phase::idle);
}
