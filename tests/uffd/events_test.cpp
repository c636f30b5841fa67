// tests/uffd/events_test.cpp — non-cooperative events: REMOVE, UNMAP, REMAP (FORK, which
// needs CAP_SYS_PTRACE, is in root_test.cpp).
//
// The thread that causes such an event blocks in the kernel until the event is read,
// so each cause runs on a worker while the test thread reads.
#include <sys/mman.h>
#include <sys/syscall.h>

#include <array>
#include <atomic>
#include <climits>

#include "helpers.hpp"

using namespace uffd_test;

TEST_CASE("uffd/events/nothing-queued-reads-as-zero-events") {
    Mapping area = Mapping::anon(1);
    Uffd u = open_registered(0, area);
    std::array<Event, 4> batch;
    auto n = u.read_events(batch);
    REQUIRE_MESSAGE(n.has_value(), err_of(n));
    CHECK(*n == 0);
}

TEST_CASE("uffd/events/madv-dontneed-yields-remove-and-placement-sees-eagain") {
    Mapping area = Mapping::anon(4);
    Uffd u = open_registered(UFFD_FEATURE_EVENT_REMOVE, area);
    const auto src = pattern(4 * kPage, 10);
    REQUIRE(u.copy(area.page(0), src.data(), 4 * kPage).ok());

    Workers w(u);
    int rc = -2;
    w.spawn([&] { rc = ::madvise(area.page(1), 2 * kPage, MADV_DONTNEED); });
    REQUIRE(wait_readable(u.fd()));
    // Page 0 is present: without the pending event this would be EEXIST.
    const IoctlOutcome pending = u.copy(area.page(0), src.data(), kPage);
    CHECK(pending.done == 0);
    CHECK(pending.err == EAGAIN);

    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    CHECK(ev->kind == Event::Kind::remove);
    CHECK(ev->address == addr(area.page(1)));
    CHECK(ev->end == addr(area.page(3)));
    REQUIRE(w.wait_all());
    CHECK(rc == 0);

    // The removed pages are missing again; the others kept their bytes.
    CHECK(u.copy(area.page(0), src.data(), kPage).err == EEXIST);
    CHECK(u.copy(area.page(1), src.data() + kPage, 2 * kPage).ok());
    CHECK(std::memcmp(area.page(0), src.data(), 4 * kPage) == 0);
}

TEST_CASE("uffd/events/munmap-yields-unmap-with-its-range") {
    Mapping area = Mapping::anon(4);
    Uffd u = open_registered(UFFD_FEATURE_EVENT_UNMAP, area);
    const std::uint64_t start = addr(area.page(0)), end = addr(area.page(4));

    Workers w(u);
    int rc = -2;
    w.spawn([&] { rc = ::munmap(area.page(0), area.len()); });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    REQUIRE(w.wait_all());
    area.release();
    CHECK(rc == 0);
    CHECK(ev->kind == Event::Kind::unmap);
    CHECK(ev->address == start);
    CHECK(ev->end == end);
}

TEST_CASE("uffd/events/mremap-yields-remap-with-both-addresses-and-length") {
    Mapping area = Mapping::anon(2);
    Mapping target = Mapping::anon(2, PROT_NONE);  // a reservation mremap replaces
    Uffd u = open_registered(UFFD_FEATURE_EVENT_REMAP, area);
    const std::uint64_t old_start = addr(area.page(0));
    const auto src = pattern(2 * kPage, 11);
    REQUIRE(u.copy(area.page(0), src.data(), 2 * kPage).ok());

    Workers w(u);
    void* moved = MAP_FAILED;
    w.spawn([&] {
        moved = ::mremap(area.page(0), 2 * kPage, 2 * kPage, MREMAP_MAYMOVE | MREMAP_FIXED, target.page(0));
    });
    auto ev = next_event(u);
    REQUIRE(ev.has_value());
    REQUIRE(w.wait_all());
    REQUIRE(moved == target.page(0));
    area.release();
    CHECK(ev->kind == Event::Kind::remap);
    CHECK(ev->address == old_start);
    CHECK(ev->end == addr(target.page(0)));
    CHECK(ev->len == 2 * kPage);
    CHECK(std::memcmp(target.page(0), src.data(), 2 * kPage) == 0);
    // The registration moved with the range.
    CHECK(u.copy(target.page(0), src.data(), kPage).err == EEXIST);
}

// THREAD_ID: a fault message names the thread that faulted; without the feature the
// field is 0, which the pager reads as "not reported", never as a thread.
TEST_CASE("uffd/events/thread-id-names-the-faulting-thread") {
    auto probed = Uffd::probe();
    REQUIRE_MESSAGE(probed.has_value(), err_of(probed));
    if (!probed->has(UFFD_FEATURE_THREAD_ID)) {
        WARN_MESSAGE(false, "skip: the kernel lacks UFFD_FEATURE_THREAD_ID");
        return;
    }
    for (const bool with : {true, false}) {
        CAPTURE(with);
        Mapping area = Mapping::anon(2);
        Uffd u = open_registered(with ? UFFD_FEATURE_THREAD_ID : 0, area);
        Workers w(u);
        std::atomic<int> tid{0};
        w.spawn([&] {
            tid = static_cast<int>(::syscall(SYS_gettid));
            (void)*reinterpret_cast<volatile char*>(area.page(1));
        });
        auto ev = next_event(u);
        REQUIRE(ev.has_value());
        CHECK(ev->kind == Event::Kind::pagefault);
        CHECK(ev->address == addr(area.page(1)));
        CHECK(ev->tid == (with ? static_cast<std::uint32_t>(tid.load()) : 0u));
        REQUIRE(u.zeropage(area.page(1), kPage).ok());
        REQUIRE(w.wait_all());
    }
}
