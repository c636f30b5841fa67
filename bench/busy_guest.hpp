// bench/busy_guest.hpp — a busy guest migrated post-copy at once: two lazymig-vmm
// processes (memfd RAM, 1 vCPU, `pattern` workload unpaced with --rate 0) driven through
// their management sockets, as a VMM engineer would run them.
//
// Figures: total time and post-copy time, downtime, faults, pages demanded and pushed,
// blocktime (query-migrate "blocktime-ms", 0 where the build does not report it), and
// the guest's progress (pattern pages/s from query-status) during post-copy against
// before the migration. Runs in a child of the orchestrator (it spawns processes).
#pragma once

#include <cstddef>

#include "bench/common.hpp"
#include "bench/report.hpp"

namespace bench {

// busy_* fields, or `error`. `skipped` when lazymig-vmm was not built with the bench.
[[nodiscard]] Fields busy_guest_run(std::size_t bytes);

// Runs busy_guest_run in a child, prints its lines, adds busy_* JSON keys and
// blocktime_ms. False if the migration failed or the workload did not check out.
[[nodiscard]] bool report_busy_guest(Report& rep, std::size_t bytes);

}  // namespace bench
