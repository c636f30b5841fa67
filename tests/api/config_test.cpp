// Bad configuration is refused before anything starts, with a sentence that says what
// and where; nothing is registered, listened on or connected.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fmt/format.h>

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
#ifdef LAZYMIG_RDMA_BUILT
    // RDMA is there: the URI is taken (connecting waits for migrate()); a malformed one is not.
    CHECK(source_error({mem->region()}, "rdma:10.0.0.1:4444") == "(accepted)");
    CHECK(source_error({mem->region()}, "rdma:10.0.0.1") == "source: uri 'rdma:10.0.0.1': missing :PORT");
#else
    // Without rdma-core an rdma: URI is refused with the reason, never served by TCP.
    CHECK(source_error({mem->region()}, "rdma:10.0.0.1:4444") ==
          "source: uri 'rdma:10.0.0.1:4444': this build of lazymig has no RDMA transport (rdma-core's libibverbs and "
          "librdmacm were not found when it was built; meson -Drdma=enabled requires them): Protocol not supported "
          "(errno 93)");
#endif
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

TEST_CASE("api/config/precopy-dirty-tracking-is-checked-at-create") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    REQUIRE(mem);
    auto s = Source::create({.regions = {mem->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:9",
                             .mode = Mode::hybrid, .dirty_tracking = DirtyTracking::vmm, .security = testkey::security()});
    REQUIRE_FALSE(s);
    CHECK(s.error().message() == "source: dirty tracking vmm needs SourceConfig::dirty_log");
    // Post-copy tracks nothing: the same configuration is fine there.
    CHECK(Source::create({.regions = {mem->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:9",
                          .mode = Mode::postcopy, .dirty_tracking = DirtyTracking::vmm, .security = testkey::security()}));
    auto ok = Source::create({.regions = {mem->region()}, .hooks = hooks(), .uri = "tcp:127.0.0.1:9",
                              .mode = Mode::precopy, .dirty_tracking = DirtyTracking::wp_sync, .security = testkey::security()});
    CHECK_MESSAGE(ok.has_value(), (ok ? "" : ok.error().message()));
    CHECK(to_string(DirtyTracking::wp_async) == "wp-async");
}

TEST_CASE("api/config/c-abi-precopy-parameters") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    REQUIRE(mem);
    lazymig_region region{"ram0", mem->data(), mem->size(), 4096, LAZYMIG_BACKING_ANON, -1, 0};
    lazymig_hooks h{};
    h.pause_vcpus = [](void*) {};
    h.resume_vcpus = [](void*) {};
    h.save_device_state = [](void*, void** buf, size_t* len) { *buf = nullptr; *len = 0; return 0; };
    lazymig_source* src = nullptr;
    REQUIRE(lazymig_source_create_auth(&region, 1, &h, "tcp:127.0.0.1:9", LAZYMIG_MODE_HYBRID, "none", &src) == 0);
    lazymig_precopy_params p{};
    REQUIRE(lazymig_source_get_precopy(src, &p) == 0);
    CHECK(p.downtime_limit_ms == 300);
    CHECK(p.max_rounds == 30);
    CHECK(p.compression == LAZYMIG_COMPRESSION_AUTO);
    p = {.downtime_limit_ms = 50, .max_rounds = 4, .max_precopy_bytes = 1 << 30, .max_precopy_ms = 2000,
         .compression = LAZYMIG_COMPRESSION_OFF};
    CHECK(lazymig_source_set_precopy(src, &p) == 0);
    CHECK(lazymig_source_set_max_bandwidth(src, 1000000) == 0);  // leaves the pre-copy fields alone
    lazymig_precopy_params back{};
    REQUIRE(lazymig_source_get_precopy(src, &back) == 0);
    CHECK(back.downtime_limit_ms == 50);
    CHECK(back.max_rounds == 4);
    CHECK(back.max_precopy_bytes == (1u << 30));
    CHECK(back.max_precopy_ms == 2000);
    CHECK(back.compression == LAZYMIG_COMPRESSION_OFF);
    back.compression = 7;
    CHECK(lazymig_source_set_precopy(src, &back) == -EINVAL);
    p.downtime_limit_ms = -1;
    CHECK(lazymig_source_set_precopy(src, &p) == -EINVAL);
    CHECK(std::string(lazymig_last_error()) == "lazymig_source_set_precopy: downtime_limit_ms must be a finite number >= 0");
    std::uint32_t rounds = 9;
    std::uint64_t resent = 9, stale = 9;
    char why[16] = "x";
    CHECK(lazymig_source_precopy_stats(src, &rounds, &resent, &stale, why, sizeof why) == 0);
    CHECK(rounds == 0);
    CHECK(resent == 0);
    CHECK(stale == 0);
    CHECK(std::string(why).empty());
    lazymig_source_destroy(src);
}

TEST_CASE("api/config/handed-over-uffd") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, false);
    REQUIRE(mem);
    GuestRegion r = mem->region();
    // Not a userfaultfd: refused naming it, and the fd is lazymig's (closed) either way.
    const int efd = ::eventfd(0, EFD_CLOEXEC);
    REQUIRE(efd >= 0);
    lazymig_region cr{.name = "ram0", .host = r.host, .size = r.size, .page_size = 4096, .backing = 1, .fd = -1, .fd_offset = 0};
    lazymig_hooks ch{};
    ch.pause_vcpus = [](void*) {};
    ch.resume_vcpus = [](void*) {};
    lazymig_destination* dst = nullptr;
    CHECK(lazymig_destination_listen_uffd(efd, &cr, 1, &ch, "tcp:127.0.0.1:0", "none", &dst) == -EINVAL);
    CHECK(std::string(lazymig_last_error()).find(fmt::format("destination: userfaultfd adopt: fd {} is not a userfaultfd", efd)) !=
          std::string::npos);
    CHECK(::fcntl(efd, F_GETFD) == -1);
    // A file-backed region cannot be served in another process's memory.
    const int ufd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    REQUIRE(ufd >= 0);
    uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
    REQUIRE(::ioctl(ufd, UFFDIO_API, &api) == 0);
    r.fd = 0;
    r.backing = Backing::memfd;
    auto d = Destination::listen({.regions = {r}, .hooks = hooks(), .uri = "tcp:127.0.0.1:0", .uffd = ufd, .security = testkey::security()});
    REQUIRE_FALSE(d);
    CHECK(d.error().message().find("destination region 0 'ram0': a handed-over userfaultfd is served with UFFDIO_COPY") !=
          std::string::npos);
    CHECK(::fcntl(ufd, F_GETFD) == -1);
}

TEST_CASE("api/config/c-abi-pause-and-recover-only-in-post-copy") {
    auto mem = GuestMemory::create("ram0", 1 << 20, Backing::anon, true);
    REQUIRE(mem);
    auto dmem = GuestMemory::create("ram0", 1 << 20, Backing::anon, false);
    REQUIRE(dmem);
    lazymig_region region{"ram0", mem->data(), mem->size(), 4096, LAZYMIG_BACKING_ANON, -1, 0};
    lazymig_region dregion{"ram0", dmem->data(), dmem->size(), 4096, LAZYMIG_BACKING_ANON, -1, 0};
    lazymig_hooks h{};
    h.pause_vcpus = [](void*) {};
    h.resume_vcpus = [](void*) {};
    h.save_device_state = [](void*, void** buf, size_t* len) { *buf = nullptr; *len = 0; return 0; };
    lazymig_destination* dst = nullptr;
    REQUIRE(lazymig_destination_listen_recoverable(&dregion, 1, &h, "tcp:127.0.0.1:0", "none", 5000, 1, &dst) == 0);
    lazymig_source* src = nullptr;
    REQUIRE(lazymig_source_create_auth(&region, 1, &h, "tcp:127.0.0.1:9", LAZYMIG_MODE_POSTCOPY, "none", &src) == 0);
    CHECK(lazymig_source_set_recover_timeout(src, 0) == -EINVAL);
    CHECK(lazymig_source_set_recover_timeout(src, 5000) == 0);
    CHECK(lazymig_source_pause(src) < 0);
    CHECK(std::string(lazymig_last_error()) ==
          "source: pause() during idle: only a post-copy can pause (before it the VM runs here and cancel() keeps it "
          "here; after it there is nothing to pause)");
    CHECK(lazymig_source_recover(src, "tcp:127.0.0.1:9") < 0);
    CHECK(std::string(lazymig_last_error()) == "source: recover() during idle: only a paused post-copy can recover");
    CHECK(lazymig_destination_pause(dst) < 0);
    CHECK(std::string(lazymig_last_error()).starts_with("destination: pause() during idle:"));
    CHECK(lazymig_destination_recover(dst, "tcp:127.0.0.1:0") < 0);
    CHECK(std::string(lazymig_last_error()) ==
          "destination: recover() during idle: only a paused post-copy can recover");
    lazymig_recovery_stats rs{};
    rs.pauses = 9;
    CHECK(lazymig_destination_recovery_stats(dst, &rs) == 0);
    CHECK(rs.pauses == 0);
    CHECK(rs.vm_stopped == 0);
    CHECK(lazymig_source_recovery_stats(src, &rs) == 0);
    CHECK(rs.pages_lost_in_flight == 0);
    lazymig_source_destroy(src);
    lazymig_destination_destroy(dst);
}
