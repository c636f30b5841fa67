// bench/modes.hpp — the three modes side by side on a guest that dirties its memory at
// a set rate: two lazymig-vmm processes (memfd RAM, 1 vCPU, `dirty` workload with
// --rate R pages/s, uniform random over all of RAM) driven through their management
// sockets, one fresh pair per (rate, mode). Rate 0 runs the `idle` workload instead
// (`dirty --rate 0` means unpaced).
//
// Per run: total time, downtime, bytes on the wire, pages sent more than once (pre-copy
// rounds), stale pages (hybrid), the guest's throughput lost during the migration
// (operations done from `migrate` to completion, at the source and then at the
// destination, against the rate measured before), demand faults with their p50/p99, and
// the switchover decision. Pre-copy runs with downtime-limit 50 ms, at most 30 rounds
// and 120 s: a precopy that cannot converge ends "failed", the VM still at the source.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "bench/report.hpp"

namespace bench {

// Runs every (rate, mode) in a child each; prints the table; adds modes_* JSON keys.
// False if a migration that should have completed did not, or a workload check failed.
[[nodiscard]] bool report_modes(Report& rep, std::size_t bytes, const std::vector<std::uint64_t>& rates);

}  // namespace bench
