// options.hpp — the three subcommands' options, and the parsers main() uses for them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "lazymig/lazymig.hpp"
#include "vm.hpp"

namespace vmm {

struct RunOptions {
    VmConfig vm;
    std::string qmp;                      // management socket path
    std::optional<std::string> incoming;  // "tcp:HOST:PORT"
    lazymig::Security security;           // --tls-psk-file, --tls-creds, --auth none
    bool poison_on_loss = false;          // --poison-on-loss (incoming): see lazymig.hpp
    std::uint32_t recover_timeout_ms = 60'000;  // --recover-timeout-ms: Parameters::recover_timeout
    std::uint32_t epoch_ms = 50;          // --epoch-ms: hybrid back-replication epochs
                                          // (0: none; both sides must agree)
    std::uint32_t lease_ms = 1000;        // --lease-ms: hybrid lease (both sides)
};

struct MigrateOptions {
    std::string from;                     // source management socket
    std::string to;                       // destination uri; empty: ask --dest-qmp
    std::string dest_qmp;                 // destination management socket (optional)
    lazymig::Mode mode = lazymig::Mode::postcopy;
    double timeout_s = 600;
    unsigned bulk_channels = 0;           // 0: the source's parameter as it is
    std::string report;                   // JSON timeline file (--report); empty: none
    // Pre-copy parameters set on the source before it migrates (migrate-set-parameters);
    // nullopt: as they are.
    std::optional<std::uint64_t> max_bandwidth, max_precopy_bytes;
    std::optional<std::uint32_t> downtime_limit_ms, max_rounds, max_precopy_ms;
    std::string compression;              // off|on|auto; empty: as it is
};

struct KvClientOptions {
    std::uint16_t port = 0;
    std::uint16_t failover_port = 0;      // 0: none
    std::uint64_t keys = 1000;
    std::string state;                    // acked sequence numbers, one per line
    std::string prefix = "key";
    bool verify = false;
    double timeout_s = 30;                // per request
};

struct QmpOptions {
    std::string socket;
    std::string command;
    std::string arguments;                // a JSON object, or empty
    double timeout_s = 60;
};

// "4096", "64K", "256M", "1G", "1GiB" → bytes.
[[nodiscard]] lazymig::Result<std::uint64_t> parse_size(std::string_view s);
// "25%" or "25" → 25; 1..100.
[[nodiscard]] lazymig::Result<std::uint32_t> parse_percent(std::string_view s);
[[nodiscard]] lazymig::Result<WorkloadKind> parse_workload(std::string_view s);
[[nodiscard]] lazymig::Result<DirtyPattern> parse_pattern(std::string_view s);

int run_vm(const RunOptions& o);
int run_migrate(const MigrateOptions& o);
int run_kv_client(const KvClientOptions& o);
int run_qmp(const QmpOptions& o);

}  // namespace vmm
