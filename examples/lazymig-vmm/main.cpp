// lazymig-vmm — an example VMM that embeds lazymig through its public API.
//
//   lazymig-vmm run --memory 256M --workload pattern --qmp /tmp/src.sock
//   lazymig-vmm run --memory 256M --workload pattern --qmp /tmp/dst.sock --incoming tcp:127.0.0.1:0
//   lazymig-vmm migrate --from /tmp/src.sock --dest-qmp /tmp/dst.sock --mode postcopy
//   lazymig-vmm kv-client --port 5000 --keys 10000 [--verify]
//   lazymig-vmm qmp --socket /tmp/dst.sock check-workload
#include <cstdio>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "options.hpp"

namespace {

template <class T>
bool assign(lazymig::Result<T> r, T& out) {
    if (!r) {
        fmt::print(stderr, "lazymig-vmm: {}\n", r.error().message());
        return false;
    }
    out = *r;
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"lazymig-vmm: an example VMM whose memory migrates with lazymig"};
    app.require_subcommand(1);

    vmm::RunOptions run;
    std::string memory = "256M", backing = "memfd", workload = "pattern", pattern = "seq", working_set = "100%";
    std::string incoming;
    double rate = -1;
    unsigned vcpus = 2, kv_port = 0;
    auto* r = app.add_subcommand("run", "start a VM: guest RAM, vCPUs running a workload, a management socket");
    r->add_option("--memory", memory, "guest RAM size (256M, 1G)")->capture_default_str();
    r->add_option("--backing", backing, "anon, memfd or hugetlbfs")->capture_default_str();
    r->add_option("--vcpus", vcpus, "vCPU threads")->capture_default_str();
    r->add_option("--workload", workload, "pattern, bank, kv, idle or dirty")->capture_default_str();
    r->add_option("--rate", rate, "operations (pages, transfers) per second for the whole VM; 0 = unpaced "
                                  "[pattern 200000, bank 100000, dirty 20000]");
    r->add_option("--pattern", pattern, "dirty: seq, random or zipf")->capture_default_str();
    r->add_option("--working-set", working_set, "dirty: share of RAM written (25%)")->capture_default_str();
    r->add_option("--incoming", incoming, "wait for a migration on tcp:HOST:PORT or rdma:HOST:PORT (port 0: any)");
    r->add_option("--qmp", run.qmp, "management socket path")->required();
    r->add_option("--epoch-ms", run.epoch_ms, "hybrid: back-replication epoch in ms (0: no back-replication; "
                  "source and destination must agree)")->capture_default_str();
    r->add_option("--lease-ms", run.lease_ms, "hybrid: the destination's lease in ms (both sides)")->capture_default_str();
    r->add_option("--kv-port", kv_port, "kv: TCP port of the service (0: any)")->capture_default_str();
    std::string psk_file, creds, auth;
    r->add_option("--tls-psk-file", psk_file, "the migration's pre-shared key: a 0600 file of hex "
                                              "(`openssl rand -hex 32`), the same on both VMs");
    r->add_option("--tls-creds", creds, "x509 credentials directory: ca-cert.pem, server-cert.pem/server-key.pem "
                                        "(destination), client-cert.pem/client-key.pem (source)");
    r->add_option("--tls-peer-name", run.security.peer_name, "x509: the name the peer's certificate must carry");
    r->add_option("--auth", auth, "'none': migrate without authentication or encryption (anyone who reaches "
                                  "the port can take the VM over)");
    r->add_flag("--poison-on-loss", run.poison_on_loss,
                "incoming: if the source is lost during post-copy, poison only the pages that never arrived (a vCPU "
                "touching one stops with a memory error) instead of stopping the VM");
    r->add_option("--recover-timeout-ms", run.recover_timeout_ms,
                  "post-copy: how long a paused migration waits for migrate-recover before it gives up (the "
                  "destination then takes the source as lost)")->capture_default_str()->check(CLI::Range(1u, 86'400'000u));

    vmm::MigrateOptions mig;
    std::string mode = "postcopy";
    auto* m = app.add_subcommand("migrate", "drive a migration between two VMs through their management sockets");
    m->add_option("--from", mig.from, "source management socket")->required();
    m->add_option("--to", mig.to, "destination uri tcp:HOST:PORT or rdma:HOST:PORT (default: asked from --dest-qmp)");
    m->add_option("--dest-qmp", mig.dest_qmp, "destination management socket: progress, check-workload");
    m->add_option("--mode", mode, "postcopy, precopy or hybrid")->capture_default_str();
    m->add_option("--timeout", mig.timeout_s, "seconds before the migration is cancelled")->capture_default_str();
    m->add_option("--bulk-channels", mig.bulk_channels, "bulk channels, each with its own sender and receiver thread "
                                                        "(1-16; default: from the source's CPU count)")
        ->check(CLI::Range(1u, 16u));
    m->add_option("--report", mig.report, "write the progress timeline (one sample per 100 ms) to this JSON file");
    m->add_option("--max-bandwidth", mig.max_bandwidth, "bytes/s for pre-copy rounds and the pusher (0: unlimited)");
    m->add_option("--downtime-limit", mig.downtime_limit_ms, "ms: pre-copy stops and copies when the rest fits (default 300)");
    m->add_option("--max-rounds", mig.max_rounds, "pre-copy rounds at most (0: no bound; default 30)");
    m->add_option("--max-precopy-bytes", mig.max_precopy_bytes, "bytes pre-copy may send (0: no bound)");
    m->add_option("--max-precopy-ms", mig.max_precopy_ms, "ms pre-copy may last (0: no bound)");
    m->add_option("--compression", mig.compression, "lz4 for pre-copy pages: off, on or auto (default auto)")
        ->check(CLI::IsMember({"off", "on", "auto"}));

    vmm::KvClientOptions kv;
    auto* k = app.add_subcommand("kv-client", "write sequence-numbered keys to a kv VM, or verify them");
    k->add_option("--port", kv.port, "kv service port on 127.0.0.1")->required();
    k->add_option("--failover-port", kv.failover_port, "port to continue on when the first one goes away");
    k->add_option("--keys", kv.keys, "keys to write (or verify when no --state)")->capture_default_str();
    k->add_option("--state", kv.state, "file of acknowledged sequence numbers (written, then verified)");
    k->add_option("--prefix", kv.prefix, "key prefix")->capture_default_str();
    k->add_flag("--verify", kv.verify, "read back every acknowledged write");
    k->add_option("--timeout", kv.timeout_s, "seconds to wait for one response")->capture_default_str();

    vmm::QmpOptions qmp;
    auto* q = app.add_subcommand("qmp", "send one command to a management socket and print its return value");
    q->add_option("--socket", qmp.socket, "management socket")->required();
    q->add_option("command", qmp.command, "command name, e.g. query-status")->required();
    q->add_option("arguments", qmp.arguments, "arguments as a JSON object");
    q->add_option("--timeout", qmp.timeout_s, "seconds to wait for the answer")->capture_default_str();

    CLI11_PARSE(app, argc, argv);

    if (r->parsed()) {
        auto& c = run.vm;
        c.workload.vcpus = vcpus;
        c.workload.kv_port = static_cast<std::uint16_t>(kv_port);
        std::uint64_t bytes = 0;
        if (!assign(vmm::parse_size(memory), bytes) || !assign(lazymig::parse_backing(backing), c.backing) ||
            !assign(vmm::parse_workload(workload), c.workload.kind) ||
            !assign(vmm::parse_pattern(pattern), c.workload.pattern) ||
            !assign(vmm::parse_percent(working_set), c.workload.working_set_pct))
            return 2;
        c.memory = bytes;
        if (kv_port > 65535) return fmt::print(stderr, "lazymig-vmm: --kv-port {} is not a port\n", kv_port), 2;
        using K = vmm::WorkloadKind;
        c.workload.rate = rate >= 0 ? rate
                        : c.workload.kind == K::pattern ? 200'000
                        : c.workload.kind == K::bank    ? 100'000
                        : c.workload.kind == K::dirty   ? 20'000
                                                        : 0;
        const int ways = !psk_file.empty() + !creds.empty() + !auth.empty();
        if (!auth.empty() && auth != "none")
            return fmt::print(stderr, "lazymig-vmm: --auth takes only 'none' (keys: --tls-psk-file, --tls-creds)\n"), 2;
        if (ways > 1)
            return fmt::print(stderr, "lazymig-vmm: choose one of --tls-psk-file, --tls-creds and --auth none\n"), 2;
        if (!psk_file.empty()) run.security = {.auth = lazymig::Auth::psk, .psk_file = psk_file, .peer_name = {}};
        else if (!creds.empty()) run.security = {.auth = lazymig::Auth::x509, .creds_dir = creds,
                                                 .peer_name = run.security.peer_name};
        else if (auth == "none") run.security = {.auth = lazymig::Auth::none};
        if (!incoming.empty()) {
            run.incoming = incoming;
            c.incoming = true;
        }
        return vmm::run_vm(run);
    }
    if (m->parsed()) {
        if (!assign(lazymig::parse_mode(mode), mig.mode)) return 2;
        if (mig.to.empty() && mig.dest_qmp.empty())
            return fmt::print(stderr, "lazymig-vmm: migrate needs --to or --dest-qmp\n"), 2;
        return vmm::run_migrate(mig);
    }
    if (q->parsed()) return vmm::run_qmp(qmp);
    if (kv.verify && kv.failover_port)
        return fmt::print(stderr, "lazymig-vmm: --failover-port is for writing, not --verify\n"), 2;
    return vmm::run_kv_client(kv);
}
