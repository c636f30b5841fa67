// bench/series.hpp — figures that take several migrations: the switchover downtime over
// many small migrations, and the push rate for each number of bulk channels.
// Each prints its lines and target checks and adds its JSON keys; false if a migration
// failed or left wrong memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "bench/common.hpp"
#include "bench/report.hpp"
#include "lazymig/lazymig.hpp"

namespace bench {

// `n` post-copy switchovers of a `bytes` memfd guest, each to a fresh destination: p50,
// p99 (nearest rank) and max of the downtime, and for the slowest one where the time
// went, from the hooks' CLOCK_MONOTONIC stamps in both processes.
// JSON: downtime_{p50,p99,max}_ms, downtime_switchovers, downtime_slowest_*_ms,
// device_state_ms.
[[nodiscard]] bool downtime_series(Report& rep, std::size_t bytes, int n);

// A pure push of `bytes` from `source` (a source_server child) with each of `channels`
// as Parameters::bulk_channels on both ends, beside the pipeline floor.
// JSON: push_gbps_channels_<n>, push_ratio_channels_<n>, bulk_channels_used_<n>.
[[nodiscard]] bool bulk_channel_sweep(Report& rep, Child& source, std::size_t bytes, lazymig::Backing backing,
                                      const std::vector<std::uint32_t>& channels, double pipeline_gbps);

}  // namespace bench
