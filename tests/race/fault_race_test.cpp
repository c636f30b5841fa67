// Races on one page: many faults at once, and a fault against a push of the same page.
#include <doctest/doctest.h>

#include <atomic>

#include "src/failpoint.hpp"
#include "tests/race/harness.hpp"

using namespace race;

namespace {

// Reads page `p` of the destination and compares it with the source's contents.
bool page_is_right(Pair& pair, std::uint64_t p) {
    std::vector<std::uint64_t> got(kWords), want(kWords);
    if (!guarded_read(got.data(), pair.dst_page(p), kPage)) return false;
    expected_page(p, want.data());
    return got == want;
}

struct DisarmOnExit {
    ~DisarmOnExit() { lazymig::failpoint::disarm_all(); }
};

}  // namespace

// Sixteen threads fault on one page at once: one request goes out, every thread wakes
// to the right bytes. The pusher is held at its first batch (failpoint) until they have
// all read it, so only the demand path can bring page 3000.
TEST_CASE("race/many-threads-fault-one-page") {
    constexpr std::uint64_t kTarget = 3000;
    constexpr int kThreads = 16;
    SigbusGuard guard;
    Pair pair(pick_backing(), 16u << 20);
    PusherHold hold;
    Threads threads([&] { pair.cancel(); });
    Flag go;
    std::atomic<int> right{0};
    for (int i = 0; i < kThreads; ++i)
        threads.spawn([&] {
            if (!go.wait_for()) return;
            right += page_is_right(pair, kTarget);
        });
    pair.migrate();
    REQUIRE_MESSAGE(hold.wait_held(), "the pusher never reached its first batch");
    go.set();
    REQUIRE_MESSAGE(threads.wait_all(), "guest threads still blocked on page ", kTarget);
    CHECK(right == kThreads);

    auto s = pair.dst().stats();
    CHECK(s.requests == 1);
    CHECK(s.faults >= 1);
    CHECK(s.faults <= kThreads);
    CHECK(s.pages_pushed == 0);  // the pusher is still held: the demand path did it all
    // (pages_demanded is counted after the placing ioctl has already woken the threads,
    // so it is checked once the migration is over.)

    hold.release();
    pair.check_clean_end(pair.finish());
    CHECK_FALSE(hold.timed_out());
    CHECK(pair.pages_differing_from_source() == 0);
    s = pair.dst().stats();
    CHECK(s.requests == 1);
    CHECK(s.pages_demanded == 1);
    CHECK(pair.src().stats().requests == 1);
    CHECK(s.pages_pushed + s.pages_demanded == pair.pages());
}

// Page X is in a bulk frame that has been received and verified but is held just before
// placement (failpoint pager_bulk_before_place) until a guest thread has demanded X and
// read it. Then the bulk frame is placed: X must count as a duplicate, and its bytes
// must be the source's.
TEST_CASE("race/push-and-demand-same-page") {
    constexpr std::uint64_t kTarget = 1000;
    SigbusGuard guard;
    DisarmOnExit disarm;
    Pair pair(pick_backing(), 16u << 20);
    Flag bulk_holds_x, reader_done;
    std::atomic<int> hits{0}, hits_for_x{0};
    std::atomic<bool> hold_timed_out{false};
    lazymig::failpoint::arm("pager_bulk_before_place", [&](const lazymig::failpoint::Site& site) {
        ++hits;
        if (site.region != 0 || kTarget < site.first || kTarget >= site.first + site.count) return 0;
        ++hits_for_x;
        bulk_holds_x.set();
        if (!reader_done.wait_for()) hold_timed_out = true;  // failure detector only
        return 0;
    });
    Threads threads([&] {
        reader_done.set();
        pair.cancel();
    });
    std::atomic<bool> right{false};
    threads.spawn([&] {
        if (!bulk_holds_x.wait_for()) return;
        right = page_is_right(pair, kTarget);
        reader_done.set();
    });
    pair.migrate();
    REQUIRE_MESSAGE(threads.wait_all(), "the reader of page ", kTarget, " did not finish");
    CHECK(right);
    pair.check_clean_end(pair.finish());
    CHECK(hits_for_x == 1);
    CHECK(hits > 1);
    CHECK_FALSE(hold_timed_out);
    CHECK(page_is_right(pair, kTarget));
    CHECK(pair.pages_differing_from_source() == 0);
    const auto s = pair.dst().stats();
    CHECK(s.duplicate_pages >= 1);
    CHECK(s.pages_demanded >= 1);
    CHECK(s.requests >= 1);
}

// A vCPU faults on a page while that page is being placed: the fault thread stamps it
// after the placement took its time, and the wait must count as zero. It once wrapped to
// 2^32 µs (4.4e9) in the fault-latency histogram.
TEST_CASE("race/fault-during-placement-waits-zero") {
    constexpr std::uint64_t kTarget = 1000;
    SigbusGuard guard;
    DisarmOnExit disarm;
    Pair pair(pick_backing(), 16u << 20);
    Flag in_window, fault_seen;
    std::atomic<int> windows{0};
    std::atomic<bool> fault_stamped{false};
    lazymig::failpoint::arm("pager_fault_in_flight", [&](const lazymig::failpoint::Site& site) {
        if (site.region == 0 && site.first == kTarget) {
            fault_stamped = true;
            fault_seen.set();
        }
        return 0;
    });
    lazymig::failpoint::arm("pager_before_place_run", [&](const lazymig::failpoint::Site& site) {
        if (site.region != 0 || kTarget < site.first || kTarget >= site.first + site.count) return 0;
        if (windows++ == 0) {
            in_window.set();
            (void)fault_seen.wait_for();  // failure detector only: the reader's fault sets it
        }
        return 0;
    });
    Threads threads([&] {
        fault_seen.set();
        pair.cancel();
    });
    std::atomic<bool> right{false};
    threads.spawn([&] {
        if (!in_window.wait_for()) return;
        right = page_is_right(pair, kTarget);  // faults: the page is mid-placement
    });
    pair.migrate();
    REQUIRE_MESSAGE(threads.wait_all(), "the reader of page ", kTarget, " did not finish");
    pair.check_clean_end(pair.finish());
    CHECK(right);
    CHECK(windows >= 1);
    CHECK(fault_stamped);
    const auto lat = pair.dst().stats().fault_latency;
    CHECK(lat.count >= 1);
    CHECK(lat.max_us < 60e6);  // an invariant: no wait longer than the test itself
}
