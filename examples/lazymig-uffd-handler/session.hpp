// session.hpp — one VMM's userfaultfd served by a lazymig Destination until the VM is
// fully resident, the VMM exits (its connection hangs up), or the handler stops.
//
// Page sources:
//  - a snapshot memory file (Firecracker's mem_file_path, regions end to end at their
//    `offset`): a lazymig Source in this process reads it with big preads
//    (SourceConfig::read_pages) and serves the Destination over loopback TCP — faults
//    are answered with a trend-grown prefetch window, and the pusher fills everything
//    else in 1 MiB frames, so the VM becomes resident without waiting for its faults;
//  - a remote lazymig Source: the Destination listens on `listen_uri` and any lazymig
//    Source with regions "ram0", "ram1", ... of the mappings' sizes connects to it.
//
// Threads: run() blocks the caller; a waiter thread joins the Destination. The
// Destination and Source own their threads (lazymig.hpp).
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "handshake.hpp"
#include "lazymig/lazymig.hpp"

namespace uffd_handler {

struct SourceSpec {
    int snapshot_fd = -1;             // the snapshot memory file, or -1: a remote source
    std::uint64_t snapshot_size = 0;
    std::string listen_uri;           // remote source: where the Destination listens
    lazymig::Parameters parameters{};
    lazymig::Security security{};     // remote source: how it authenticates (--tls-*, --auth none)
};

struct Summary {
    unsigned number = 0;
    pid_t pid = 0;
    std::string outcome;  // "completed", "vmm-exited", "stopped", "failed", "refused"
    std::string error;
    lazymig::Stats stats;
    [[nodiscard]] std::string line() const;
    [[nodiscard]] nlohmann::json to_json() const;
};

// What the management socket shows of the running session.
struct Live {
    std::function<void(const lazymig::Destination*, std::string source_uri)> publish;
};

// Serves `h` from `spec` until the end; either of `stop_fds` readable ends it early. `live` is told
// the Destination while it exists (and nullptr after).
[[nodiscard]] Summary serve(unsigned number, Handshake h, const SourceSpec& spec, int conn, std::array<int, 2> stop_fds,
                            const Live& live);

[[nodiscard]] nlohmann::json stats_json(const lazymig::Stats& s);

}  // namespace uffd_handler
