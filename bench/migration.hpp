// bench/migration.hpp — the two endpoints of a benchmarked post-copy migration, each run
// in its own process forked by the orchestrator.
//
// Conversation (lines of fields on the pipes; → orchestrator to child, ← child to it):
//   source server  ← ready fill_ms=…                      (guest RAM allocated and filled once)
//                  → run port=P max_bandwidth=B bulk_channels=N
//                                                         (one migration to the destination at P)
//                  → release                              (lift the bandwidth limit; then wait)
//                  ← result fields (src_*)
//                  → quit
//   destination    ← port=P                               (listening, guest RAM empty)
//                  ← touch_done …                         (its touchers stopped; the source may
//                                                          push at full speed)
//                  ← result fields (dst_*, touch_*, lib_fault_*)
// The source keeps its guest RAM across migrations (post-copy never changes it), so one
// fill serves every run of a size.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bench/common.hpp"
#include "lazymig/lazymig.hpp"

namespace bench {

struct SourceSpec {
    std::size_t bytes = 0;
    lazymig::Backing backing = lazymig::Backing::memfd;
};

struct DestinationSpec {
    std::size_t bytes = 0;
    lazymig::Backing backing = lazymig::Backing::memfd;
    int touchers = 0;                  // 0: no access at all, a pure push
    std::uint64_t max_samples = 20000;  // faulting touches recorded, over all touchers
    double max_seconds = 4;             // touching stops after this long past resume
    std::uint32_t bulk_channels = 0;    // Parameters::bulk_channels (0: the library's default)
    bool tls = false;                   // TLS 1.3 with bench_key(); else auth=none
};

// One migration served by `source` (a source_server child) to a fresh destination
// process. Returns the merged reports of both sides (with `error` if anything went wrong).
struct MigrationRun {
    std::size_t bytes = 0;
    lazymig::Backing backing = lazymig::Backing::memfd;
    int touchers = 0;
    std::uint64_t max_samples = 20000;
    double max_bandwidth = 0;          // bytes/s until the touchers stop; 0 = unlimited
    std::uint32_t bulk_channels = 0;   // both ends' Parameters::bulk_channels
    bool tls = false;                  // both ends: TLS 1.3 with bench_key() (else auth=none)
};

// The pre-shared key of this benchmark run (made before the children fork).
[[nodiscard]] const std::vector<std::byte>& bench_key();
// How a benchmarked endpoint authenticates: TLS with bench_key(), or none.
[[nodiscard]] lazymig::Security bench_security(bool tls);
[[nodiscard]] Fields run_migration(Child& source, const MigrationRun& r);

// Bodies for Child::spawn: (command fd, report fd) → exit code.
int source_server(const SourceSpec& spec, int command_fd, int report_fd);
int destination_run(const DestinationSpec& spec, int command_fd, int report_fd);

// Bytes of bookkeeping the design allows beyond guest RAM, per side and per channel:
//   destination: page-state byte + 4-byte fault stamp + 1 bit "file page may hold data"
//                per page, and one 4 MiB receive buffer per channel (urgent + N bulk);
//   source:      one sent byte per page, two 4 MiB staging buffers per bulk channel
//                (pipelining) and one for the urgent channel's demand replies.
inline constexpr std::uint64_t kChannelBuffer = 4u << 20;
[[nodiscard]] inline std::uint64_t destination_bound(std::size_t bytes, std::uint32_t bulk_channels = 1) {
    const std::uint64_t pages = bytes / kPage;
    return pages * 5 + (pages + 7) / 8 + (bulk_channels + 1) * kChannelBuffer;
}
[[nodiscard]] inline std::uint64_t source_bound(std::size_t bytes, std::uint32_t bulk_channels = 1) {
    return bytes / kPage + (2 * bulk_channels + 1) * kChannelBuffer;
}

}  // namespace bench
