// bench/replication.hpp — what back-replication costs a guest during a long post-copy:
// the same hybrid migration with epochs on (the default 50 ms) and off (--epoch-ms 0 on
// both VMs), two lazymig-vmm processes each (memfd RAM, 1 vCPU running `dirty`
// unpaced, zipf over a 25% working set: a hot set that is present soon after resume and
// rewritten all the time, and a long tail). Over all of RAM (1 GiB) the epochs carried
// ~8-9k pages each, a sixth of them larger than the staging area, and on a loaded
// machine one run's lease lapsed (the destination fenced, as designed).
//
// The post-copy is made long on purpose: one pre-copy round at full speed (max-rounds 1,
// downtime-limit 1 ms, so hybrid always switches to post-copy), then, once the VM
// resumed on the destination, the source's pusher is throttled to --repl-mbps MB/s, so
// the stale pages (those the guest dirtied during the round) take seconds to arrive and
// many epochs run meanwhile.
//
// Per row: total migration time and post-copy time beside the link's floor for the
// post-copy (bytes that crossed it after resume / the throttle); the guest's progress
// during post-copy beside its rate measured just before the migration in the same run
// (the machine's floor for this guest: no migration at all); epochs, pause and commit.
#pragma once

#include <cstddef>

#include "bench/report.hpp"

namespace bench {

// Runs epochs on and off, `runs` times each, alternating; prints the table; adds repl_*
// JSON keys. False if a migration did not complete or a workload check failed.
[[nodiscard]] bool report_replication(Report& rep, std::size_t bytes, double mbps, int runs);

}  // namespace bench
