// When every page has arrived, both ends must say so: wait() succeeds, the phase is
// completed, and the destination does not pause the VM it has just received.
//
//
// Regressions guarded here (each once made a completed migration end failed):
// - the source closed its bulk socket while the pusher still ran, and the pusher's
//   resulting error was recorded as the migration's (SourceImpl::session now stops the
//   pusher before its sockets close, and nothing after COMPLETE counts);
// - the destination's stop event cancelled a bulk receive after the last page, and
//   that ECANCELED took the failure path: pause_vcpus() on a whole VM, uffd left
//   registered (DestinationImpl::fail now ignores every error once all pages are
//   present);
// - cancel() after the end recorded "migration cancelled" (cancel is now a no-op then).
#include <doctest/doctest.h>

#include "src/failpoint.hpp"
#include "tests/race/harness.hpp"

using namespace race;

// The pusher is held at its first batch (failpoint) while a guest thread demands all
// 512 pages; then it is let go and finds every page sent already.
TEST_CASE("race/clean-end-when-demand-outruns-the-pusher") {
    SigbusGuard guard;
    Pair pair(pick_backing(), 2u << 20, lazymig::Parameters{.push_batch_pages = 16});
    PusherHold hold;
    Threads threads([&] { pair.cancel(); });
    std::atomic<std::uint64_t> read{0};
    Flag go;
    threads.spawn([&] {
        if (!go.wait_for()) return;
        std::vector<std::byte> buf(kPage);
        for (std::uint64_t p = 0; p < pair.pages(); ++p) read += guarded_read(buf.data(), pair.dst_page(p), kPage);
    });
    pair.migrate();
    REQUIRE_MESSAGE(hold.wait_held(), "the pusher never reached its first batch");
    go.set();
    REQUIRE_MESSAGE(threads.wait_all(), "the guest thread did not finish");
    CHECK(read == pair.pages());
    CHECK(pair.dst().stats().pages_pushed == 0);
    hold.release();
    const auto end = pair.finish();
    CHECK_FALSE(hold.timed_out());
    CHECK(pair.pages_differing_from_source() == 0);
    // All but the held batch's 16 pages came by demand (prefetch may have brought those too).
    CHECK(pair.dst().stats().pages_demanded >= pair.pages() - 16);
    pair.check_clean_end(end);
}

// The first bulk frame is held before placement (failpoint) while a guest thread brings
// every page by demand. The source gets COMPLETE and closes; only then is the bulk frame
// released, with megabytes of pushed duplicates still queued behind it on the bulk
// socket. The destination's session thread sees the urgent channel close meanwhile and
// signals its stop event while the bulk receiver is still reading.
TEST_CASE("race/clean-end-when-the-bulk-channel-lags") {
    struct DisarmOnExit {
        ~DisarmOnExit() { lazymig::failpoint::disarm_all(); }
    } disarm;
    SigbusGuard guard;
    Pair pair(pick_backing(), 16u << 20);
    Flag held, release;
    std::atomic<int> holds{0};
    lazymig::failpoint::arm("pager_bulk_before_place", [&](const lazymig::failpoint::Site&) {
        if (holds++ == 0) {
            held.set();
            (void)release.wait_for();  // failure detector only: the test releases it
        }
        return 0;
    });
    Threads threads([&] {
        release.set();
        pair.cancel();
    });
    threads.spawn([&] {
        if (!held.wait_for()) return;
        std::vector<std::byte> buf(kPage);
        for (std::uint64_t p = 0; p < pair.pages(); ++p) (void)guarded_read(buf.data(), pair.dst_page(p), kPage);
    });
    pair.migrate();
    REQUIRE_MESSAGE(threads.wait_all(), "the guest thread did not finish");
    auto src_end = bounded_wait(pair.src());  // COMPLETE arrived; the source has closed its sockets
    release.set();
    const auto end = pair.finish();
    CHECK(holds >= 1);  // the held batch; later ones only if they were in flight before the close
    CHECK(pair.pages_differing_from_source() == 0);
    CHECK(pair.dst().stats().duplicate_pages > 0);
    pair.check_clean_end(Outcome{end.dst, src_end});
}

// cancel() after a completed migration changes nothing: a VMM that cancels in its
// clean-up path must still learn that the migration succeeded.
TEST_CASE("race/cancel-after-completion-changes-nothing") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 1u << 20);
    pair.migrate();
    auto end = pair.finish();
    REQUIRE_MESSAGE(end.clean(), "destination: ", err_of(end.dst), "; source: ", err_of(end.src));
    pair.dst().cancel();
    pair.src().cancel();
    auto d = bounded_wait(pair.dst());
    auto s = bounded_wait(pair.src());
    CHECK_MESSAGE(d.has_value(), "destination: ", err_of(d));
    CHECK_MESSAGE(s.has_value(), "source: ", err_of(s));
    CHECK(pair.dst().stats().error.empty());
    CHECK(pair.src().stats().error.empty());
    CHECK(pair.dst().stats().phase == lazymig::Phase::completed);
    CHECK(pair.src().stats().phase == lazymig::Phase::completed);
}
