// bench/tls.hpp — scripts/bench --tls: migrations with TLS 1.3 on and off beside a raw
// AES-128-GCM floor measured in the same run.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bench/common.hpp"
#include "bench/report.hpp"
#include "lazymig/lazymig.hpp"

namespace bench {

// Push (no touchers) and fault latency (`touchers`) runs of `bytes`, each with and
// without TLS, served by `source`; false if a migration failed.
[[nodiscard]] bool tls_rows(Report& rep, Child& source, std::size_t bytes, lazymig::Backing backing, int touchers,
                            std::uint64_t samples);

}  // namespace bench
