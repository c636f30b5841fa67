// tests/uffd/placement_test.cpp — resolving real faults: COPY, ZEROPAGE, WAKE, CONTINUE,
// WRITEPROTECT, MOVE and POISON, each fault taken by a thread of this process.
#include <sys/mman.h>
#include <sys/wait.h>

#include <array>
#include <latch>

#include "helpers.hpp"

using namespace uffd_test;

namespace {

Uffd open_uffd(std::uint64_t features) {
    auto u = Uffd::open(features);
    REQUIRE_MESSAGE(u.has_value(), err_of(u));
    return std::move(*u);
}

std::uint64_t register_or_fail(Uffd& u, void* a, std::size_t len, std::uint64_t modes) {
    auto r = u.register_range(a, len, modes);
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    return *r;
}

bool same(const char* p, const std::vector<char>& v) { return std::memcmp(p, v.data(), v.size()) == 0; }

bool all_zero(const char* p, std::size_t len) {
    for (std::size_t i = 0; i < len; ++i)
        if (p[i] != 0) return false;
    return true;
}

}  // namespace

TEST_CASE("uffd/copy/resolves-a-read-fault-of-another-thread") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_uffd(0);
    const auto ioctls = register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_MISSING);
    const std::uint64_t placement = 1ull << _UFFDIO_COPY | 1ull << _UFFDIO_ZEROPAGE | 1ull << _UFFDIO_WAKE;
    CHECK((ioctls & placement) == placement);
    const auto src = pattern(kPage, 1);
    std::vector<char> seen(kPage, 0);

    Workers w(u);
    w.spawn([&] { std::memcpy(seen.data(), area.page(0), kPage); });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    CHECK(ev->kind == Event::Kind::pagefault);
    CHECK(ev->address == addr(area.page(0)));
    CHECK_FALSE(ev->is_write());
    CHECK_FALSE(ev->is_minor());
    CHECK_FALSE(ev->is_wp());

    const IoctlOutcome out = u.copy(area.page(0), src.data(), kPage);
    CHECK(out.ok());
    CHECK(out.done == kPage);
    REQUIRE(w.wait_all());
    CHECK(seen == src);
}

TEST_CASE("uffd/copy/racing-faults-are-placed-once-later-copies-see-eexist") {
    constexpr int kThreads = 8;
    Mapping area = Mapping::anon(1);
    Uffd u = open_uffd(0);
    register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_MISSING);
    const auto src = pattern(kPage, 2);
    std::vector<std::vector<char>> seen(kThreads, std::vector<char>(kPage, 0));
    std::latch start(kThreads);

    Workers w(u);
    for (int t = 0; t < kThreads; ++t)
        w.spawn([&, t] {
            start.arrive_and_wait();
            std::memcpy(seen[t].data(), area.page(0), kPage);
        });

    int events = 0, placed = 0, existed = 0;
    while (!w.poll_finished()) {
        pollfd fds[2] = {{u.fd(), POLLIN, 0}, {w.done_fd(), POLLIN, 0}};
        REQUIRE(::poll(fds, 2, kTimeoutMs) > 0);
        std::array<Event, kThreads> batch;
        auto n = u.read_events(batch);
        REQUIRE_MESSAGE(n.has_value(), err_of(n));
        for (std::size_t i = 0; i < *n; ++i) {
            ++events;
            CHECK(batch[i].address == addr(area.page(0)));
            const IoctlOutcome out = u.copy(area.page(0), src.data(), kPage);
            if (out.ok()) {
                ++placed;
            } else {
                CHECK(out.err == EEXIST);
                CHECK(out.done == 0);
                ++existed;
            }
        }
    }
    REQUIRE(w.wait_all());
    CHECK(events >= 1);
    CHECK(placed == 1);
    CHECK(existed == events - 1);
    const IoctlOutcome again = u.copy(area.page(0), src.data(), kPage);
    CHECK(again.err == EEXIST);
    CHECK(again.done == 0);
    for (const auto& s : seen) CHECK(s == src);
}

TEST_CASE("uffd/copy/stops-before-a-present-page-then-the-retry-sees-eexist") {
    Mapping area = Mapping::anon(4);
    Uffd u = open_uffd(0);
    register_or_fail(u, area.page(0), 4 * kPage, UFFDIO_REGISTER_MODE_MISSING);
    const auto src = pattern(4 * kPage, 3);
    const auto other = pattern(kPage, 4);
    REQUIRE(u.copy(area.page(2), other.data(), kPage).ok());

    const IoctlOutcome partial = u.copy(area.page(0), src.data(), 4 * kPage);
    CHECK(partial.done == 2 * kPage);
    CHECK(partial.err == EAGAIN);
    const IoctlOutcome retry = u.copy(area.page(0) + partial.done, src.data() + partial.done,
                                      4 * kPage - partial.done);
    CHECK(retry.done == 0);
    CHECK(retry.err == EEXIST);
    CHECK(u.copy(area.page(3), src.data() + 3 * kPage, kPage).ok());

    CHECK(std::memcmp(area.page(0), src.data(), 2 * kPage) == 0);
    CHECK(same(area.page(2), other));
    CHECK(std::memcmp(area.page(3), src.data() + 3 * kPage, kPage) == 0);
}

TEST_CASE("uffd/copy/reports-bad-ranges-with-the-kernels-errno") {
    Mapping area = Mapping::anon(2);
    Uffd u = open_uffd(0);
    register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_MISSING);
    const auto src = pattern(kPage, 5);

    const IoctlOutcome unregistered = u.copy(area.page(1), src.data(), kPage);  // field: -ENOENT
    CHECK(unregistered.done == 0);
    CHECK(unregistered.err == ENOENT);
    const IoctlOutcome unaligned = u.copy(area.page(0) + 1, src.data(), kPage);  // field untouched
    CHECK(unaligned.done == 0);
    CHECK(unaligned.err == EINVAL);

    auto reg = u.register_range(area.page(1) + 8, 100, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
    REQUIRE_FALSE(reg.has_value());
    CHECK(reg.error().message() == "UFFDIO_REGISTER start=" + hex(addr(area.page(1) + 8)) +
                                       " len=100 mode=MISSING|WP: Invalid argument (errno 22)");
    u.close();
    auto woken = u.wake(nullptr, kPage);
    REQUIRE_FALSE(woken.has_value());
    CHECK(woken.error().message() == "UFFDIO_WAKE start=0x0 len=4096: Bad file descriptor (errno 9)");
}

TEST_CASE("uffd/zeropage/resolves-a-fault-with-zeroes") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_uffd(0);
    register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_MISSING);
    std::vector<char> seen(kPage, 'x');

    Workers w(u);
    w.spawn([&] { std::memcpy(seen.data(), area.page(0), kPage); });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    CHECK(ev->address == addr(area.page(0)));
    const IoctlOutcome out = u.zeropage(area.page(0), kPage);
    CHECK(out.ok());
    CHECK(out.done == kPage);
    REQUIRE(w.wait_all());
    CHECK(all_zero(seen.data(), kPage));
    CHECK(u.zeropage(area.page(0), kPage).err == EEXIST);
}

TEST_CASE("uffd/wake/wakes-a-fault-placed-with-dontwake") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_uffd(0);
    register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_MISSING);
    const auto src = pattern(kPage, 6);
    std::vector<char> seen(kPage, 0);

    Workers w(u);
    w.spawn([&] { std::memcpy(seen.data(), area.page(0), kPage); });
    REQUIRE(next_event(u).has_value());
    CHECK(u.copy(area.page(0), src.data(), kPage, UFFDIO_COPY_MODE_DONTWAKE).ok());
    // The page is present but the faulting thread was not woken: it stays blocked.
    pollfd p{w.done_fd(), POLLIN, 0};
    CHECK(::poll(&p, 1, 100) == 0);
    auto woken = u.wake(area.page(0), kPage);
    REQUIRE_MESSAGE(woken.has_value(), err_of(woken));
    REQUIRE(w.wait_all());
    CHECK(seen == src);
}

TEST_CASE("uffd/continue/maps-bytes-written-through-a-memfd-alias") {
    const int mfd = ::memfd_create("uffd-minor", MFD_CLOEXEC);
    REQUIRE(mfd >= 0);
    REQUIRE(::ftruncate(mfd, static_cast<off_t>(3 * kPage)) == 0);
    Mapping alias = Mapping::shared(mfd, 3);
    Mapping guest = Mapping::shared(mfd, 3);
    ::close(mfd);
    Uffd u = open_uffd(UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM);
    const auto src0 = pattern(kPage, 7), src1 = pattern(kPage, 8);
    std::memcpy(alias.page(0), src0.data(), kPage);  // in the page cache before the guest runs
    const auto ioctls = register_or_fail(u, guest.page(0), 3 * kPage,
                                         UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR);
    CHECK((ioctls & (1ull << _UFFDIO_CONTINUE)) != 0);
    std::vector<char> seen0(kPage, 0), seen1(kPage, 0);

    Workers w(u);
    w.spawn([&] { std::memcpy(seen0.data(), guest.page(0), kPage); });
    auto minor = next_event(u);
    REQUIRE(minor.has_value());
    CHECK(minor->address == addr(guest.page(0)));
    CHECK(minor->is_minor());
    const IoctlOutcome mapped = u.continue_range(guest.page(0), kPage);
    CHECK(mapped.ok());
    CHECK(mapped.done == kPage);
    REQUIRE(w.wait_all());
    CHECK(seen0 == src0);
    CHECK(u.continue_range(guest.page(0), kPage).err == EEXIST);

    // Not in the page cache yet: a MISSING fault, resolved by writing the alias first.
    Workers w1(u);
    w1.spawn([&] { std::memcpy(seen1.data(), guest.page(1), kPage); });
    auto missing = next_event(u);
    REQUIRE(missing.has_value());
    CHECK(missing->address == addr(guest.page(1)));
    CHECK_FALSE(missing->is_minor());
    std::memcpy(alias.page(1), src1.data(), kPage);
    CHECK(u.continue_range(guest.page(1), kPage).ok());
    REQUIRE(w1.wait_all());
    CHECK(seen1 == src1);

    const IoctlOutcome absent = u.continue_range(guest.page(2), kPage);  // no page cache page
    CHECK(absent.done == 0);
    CHECK(absent.err == EFAULT);
}

TEST_CASE("uffd/writeprotect/a-write-waits-until-unprotected") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_uffd(UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    std::memset(area.page(0), 'a', kPage);
    const auto ioctls = register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_WP);
    CHECK((ioctls & (1ull << _UFFDIO_WRITEPROTECT)) != 0);
    auto wp = u.writeprotect(area.page(0), kPage, true);
    REQUIRE_MESSAGE(wp.has_value(), err_of(wp));

    Workers w(u);
    w.spawn([&] { *reinterpret_cast<volatile char*>(area.page(0)) = 'Z'; });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    CHECK(ev->address == addr(area.page(0)));
    CHECK(ev->is_wp());
    CHECK(ev->is_write());
    CHECK(area.page(0)[0] == 'a');  // reads are allowed; the write has not happened
    auto unprotect = u.writeprotect(area.page(0), kPage, false);
    REQUIRE_MESSAGE(unprotect.has_value(), err_of(unprotect));
    REQUIRE(w.wait_all());
    CHECK(area.page(0)[0] == 'Z');
    CHECK(area.page(0)[1] == 'a');
}

TEST_CASE("uffd/move/moves-a-page-and-leaves-a-hole-behind") {
    Mapping src = Mapping::anon(1);
    Mapping dst = Mapping::anon(2);
    Uffd u = open_uffd(UFFD_FEATURE_MOVE);
    register_or_fail(u, dst.page(0), 2 * kPage, UFFDIO_REGISTER_MODE_MISSING);
    const auto bytes = pattern(kPage, 9);
    std::memcpy(src.page(0), bytes.data(), kPage);
    std::vector<char> seen(kPage, 0);

    Workers w(u);
    w.spawn([&] { std::memcpy(seen.data(), dst.page(0), kPage); });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    CHECK(ev->address == addr(dst.page(0)));
    const IoctlOutcome moved = u.move(dst.page(0), src.page(0), kPage);
    CHECK(moved.ok());
    CHECK(moved.done == kPage);
    REQUIRE(w.wait_all());
    CHECK(seen == bytes);

    unsigned char resident = 1;
    REQUIRE(::mincore(src.page(0), kPage, &resident) == 0);
    CHECK((resident & 1) == 0);  // the source is a hole now
    const IoctlOutcome from_hole = u.move(dst.page(1), src.page(0), kPage);
    CHECK(from_hole.done == 0);
    CHECK(from_hole.err == ENOENT);
    const IoctlOutcome holes_ok = u.move(dst.page(1), src.page(0), kPage, lazymig::uffd::kMoveModeAllowSrcHoles);
    CHECK(holes_ok.ok());
    CHECK(holes_ok.done == kPage);
    CHECK(all_zero(src.page(0), kPage));
}

TEST_CASE("uffd/poison/touching-a-poisoned-page-raises-sigbus") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_uffd(UFFD_FEATURE_POISON);
    const auto ioctls = register_or_fail(u, area.page(0), kPage, UFFDIO_REGISTER_MODE_MISSING);
    CHECK((ioctls & (1ull << _UFFDIO_POISON)) != 0);
    const IoctlOutcome poisoned = u.poison(area.page(0), kPage);
    CHECK(poisoned.ok());
    CHECK(poisoned.done == kPage);
    const IoctlOutcome twice = u.poison(area.page(0), kPage);
    CHECK(twice.done == 0);
    CHECK(twice.err == EEXIST);

    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        const char c = *reinterpret_cast<volatile char*>(area.page(0));
        ::_exit(c == 0 ? 3 : 4);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGBUS);
}
