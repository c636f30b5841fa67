// failpoint.hpp — named points where tests inject failures or delays.
//
//   LZ_FAILPOINT("pager_bulk_before_place", region, first, count);
//
// Costs one relaxed load when nothing is armed. Tests arm a point with a callback that
// may block (to force an interleaving) or return an errno to make the step fail.
// Points: pager_bulk_before_place, pager_urgent_before_place (a verified frame, before
// any claim), pager_before_place_run (claimed, placement time taken, before the ioctl),
// pager_fault_in_flight (a fault on a page already requested or being placed),
// pager_request_blocked (the outbox had no room for a page request: it stays pending),
// source_push_batch, source_serve_request, source_precopy_round (the start of each
// pre-copy round; first = the round's number), source_precopy_batch, source_before_go,
// destination_before_device_loaded, destination_after_go.
// Named for issue 11 (the epoch points; sites pass (0, epoch, pages)):
// destination_epoch_send, source_epoch_apply, destination_epoch_committed;
// source_complete_read (COMPLETE read, before the source acts on it: an error there is a
// link that died with COMPLETE unread).
// recover_handshake (either side, in the resume handshake of a recover(): source after
// connecting, before RESUME; destination after accepting RESUME, before LACKING — an
// error there is a link failure: paused again).
//
// A process a test starts (lazymig-vmm, a peer) is armed through its environment,
// read once when the library is loaded:
//
//   LAZYMIG_FAILPOINTS="source_push_batch=hold;source_serve_request=error:5"
//
// Actions:
//   error:E      every hit fails with errno E (a number)
//   hold         every hit blocks until the deadline (kHoldLimit) and then fails with
//                ETIMEDOUT: for a process the test kills while it is held
//   hold:FIFO    every hit blocks until a byte is written to the named pipe FIFO (which
//                the test made with mkfifo), then goes on; from then on the point is
//                open: later hits pass at once. At the deadline the hit fails with
//                ETIMEDOUT, so a test that forgot to release fails instead of hanging.
//   kill         the first hit SIGKILLs this process (tests/chaos: a host that dies
//                there); a line naming the point goes to stderr first
//   kill:N       the N-th hit (counted over all threads) SIGKILLs this process; the
//                hits before pass. `source_push_batch=kill:20`: mid post-copy, always
//                at the same batch
// A spec that does not parse is reported on stderr and arms nothing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace lazymig::failpoint {

struct Site {
    std::uint32_t region = 0;
    std::uint64_t first = 0;
    std::uint32_t count = 0;
};
// Returns 0 to go on, or an errno the step fails with.
using Action = std::function<int(const Site&)>;

void arm(std::string_view name, Action action);
void disarm_all();

// The longest a `hold` action blocks: a failure detector, longer than any step a test
// waits for, shorter than the test's own timeout.
inline constexpr std::chrono::seconds kHoldLimit{60};

// Arms the points of a LAZYMIG_FAILPOINTS-style spec. Returns "" or what was wrong
// (then nothing of the spec is armed).
[[nodiscard]] std::string arm_spec(std::string_view spec);

namespace detail {
extern std::atomic<int> g_armed;
int hit(std::string_view name, const Site& site);
}  // namespace detail

inline int check(std::string_view name, std::uint32_t region, std::uint64_t first, std::uint32_t count) {
    if (detail::g_armed.load(std::memory_order_relaxed) == 0) return 0;
    return detail::hit(name, Site{region, first, count});
}

}  // namespace lazymig::failpoint
