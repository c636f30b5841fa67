// lazymig-bench: post-copy migration figures beside this machine's floors.
//
//   lazymig-bench [--quick] [--sizes 1g,4g] [--backing memfd|anon|both] [--touchers N]
//                 [--samples N] [--throttle MBPS] [--iterations N]
//                 [--variants push,fault,throttled,sweep,downtime,busy,modes,repl] [--raw] [--tls]
//                 [--mode-size 4g] [--mode-rates 0,10000,50000,200000]
//                 [--repl-size 1g] [--repl-mbps 16] [--repl-runs 1]
//
// Floors first (loopback TCP round trip and stream, local uffd fault, memcpy), then for
// each backing and size one source process holding filled guest RAM serves three
// migrations, each to a fresh destination process:
//   push             nothing touches the destination: background transfer alone
//   fault            touch threads fault on random missing pages while the pusher runs
//   fault_throttled  the same with the pusher limited to --throttle MB/s, so faults
//                    dominate (the limit is lifted when the touchers stop)
// At the largest size a push sweep over Parameters::bulk_channels = 1, 2, 4 follows.
// Then: the switchover downtime over many small migrations (series.hpp), and a busy
// guest — lazymig-vmm running `pattern` unpaced — migrated post-copy (busy_guest.hpp),
// the three modes on a guest dirtying at set rates (modes.hpp), and what back-
// replication costs a guest during a post-copy kept long by a throttle (replication.hpp).
// The human table comes first; the last line is one JSON object with every figure.
// Exit code: 0 if every migration completed with correct memory, 1 otherwise.
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "bench/busy_guest.hpp"
#include "bench/common.hpp"
#include "bench/floors.hpp"
#include "bench/migration.hpp"
#include "bench/modes.hpp"
#include "bench/replication.hpp"
#include "bench/tls.hpp"
#include "bench/report.hpp"
#include "bench/results.hpp"
#include "bench/series.hpp"

#ifndef BENCH_BUILDTYPE
#define BENCH_BUILDTYPE "unknown"
#endif

namespace bench {
namespace {

using lazymig::Backing;

struct Options {
    std::vector<std::size_t> sizes{1ull << 30, 4ull << 30};
    std::vector<Backing> backings{Backing::memfd};
    int touchers = 1;
    std::uint64_t samples = 20000;
    double throttle_mbps = 200;
    int iterations = 20000;
    bool quick = false;
    bool push = true, fault = true, throttled = true;  // --variants
    bool sweep = true, downtime = true, busy = true;   // --variants
    bool modes = true;                                 // --variants
    bool repl = true;                                  // --variants
    std::size_t repl_size = 1ull << 30;                // --repl-size
    double repl_mbps = 16;                             // --repl-mbps
    int repl_runs = 1;                                 // --repl-runs
    std::vector<std::uint64_t> mode_rates{0, 10000, 50000, 200000};  // --mode-rates
    std::size_t mode_size = 4ull << 30;                // --mode-size
    bool raw = false;                                  // --raw: every field of every run
    bool tls = false;                                  // --tls: TLS on vs off, alone
};

std::size_t parse_size(const std::string& s) {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    const char unit = static_cast<char>(std::tolower(*end));
    const double mult = unit == 'g' ? double(1ull << 30) : unit == 'm' ? double(1ull << 20) : 1.0;
    return static_cast<std::size_t>(v * mult) / kPage * kPage;
}

std::string size_tag(std::size_t bytes) {
    if (bytes % (1ull << 30) == 0) return fmt::format("{}g", bytes >> 30);
    return fmt::format("{}m", bytes >> 20);
}

[[noreturn]] void usage(const char* why) {
    std::fprintf(stderr,
                 "lazymig-bench: %s\nusage: lazymig-bench [--quick] [--sizes 1g,4g] [--backing memfd|anon|both]\n"
                 "                     [--touchers N] [--samples N] [--throttle MBPS] [--iterations N]\n"
                 "                     [--variants push,fault,throttled,sweep,downtime,busy,modes,repl] [--raw]\n"
                 "                     [--mode-size 4g] [--mode-rates 0,10000,50000,200000]\n"
                 "                     [--repl-size 1g] [--repl-mbps 16] [--repl-runs 1]\n",
                 why);
    std::exit(2);
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(("missing value for " + a).c_str());
            return argv[++i];
        };
        if (a == "--quick") {
            o.quick = true;
            o.sizes = {256ull << 20};
            o.mode_size = 256ull << 20;
            o.mode_rates = {0, 10000, 50000};
            o.repl_size = 256ull << 20;
        } else if (a == "--sizes") {
            o.sizes.clear();
            std::string v = value();
            for (std::size_t p = 0; p <= v.size();) {
                const auto c = std::min(v.find(',', p), v.size());
                if (const auto b = parse_size(v.substr(p, c - p)); b) o.sizes.push_back(b);
                p = c + 1;
            }
            if (o.sizes.empty()) usage("--sizes needs sizes such as 256m,1g");
        } else if (a == "--backing") {
            const std::string v = value();
            if (v == "both") o.backings = {Backing::memfd, Backing::anon};
            else if (auto b = lazymig::parse_backing(v); b && *b != Backing::hugetlbfs) o.backings = {*b};
            else usage("--backing takes memfd, anon or both");
        } else if (a == "--touchers") {
            o.touchers = std::clamp(std::atoi(value().c_str()), 1, 8);
        } else if (a == "--samples") {
            o.samples = std::max(100ull, std::strtoull(value().c_str(), nullptr, 10));
        } else if (a == "--throttle") {
            o.throttle_mbps = std::max(1.0, std::atof(value().c_str()));
        } else if (a == "--variants") {
            const std::string v = "," + value() + ",";
            o.push = v.find(",push,") != std::string::npos;
            o.fault = v.find(",fault,") != std::string::npos;
            o.throttled = v.find(",throttled,") != std::string::npos;
            o.sweep = v.find(",sweep,") != std::string::npos;
            o.downtime = v.find(",downtime,") != std::string::npos;
            o.busy = v.find(",busy,") != std::string::npos;
            o.modes = v.find(",modes,") != std::string::npos;
            o.repl = v.find(",repl,") != std::string::npos;
            if (!o.push && !o.fault && !o.throttled && !o.sweep && !o.downtime && !o.busy && !o.modes && !o.repl &&
                v != ",floors,")
                usage("--variants takes push,fault,throttled,sweep,downtime,busy,modes,repl (or floors: the floors "
                      "alone)");
        } else if (a == "--mode-rates") {
            o.mode_rates.clear();
            std::string v = value();
            for (std::size_t p = 0; p <= v.size();) {
                const auto c = std::min(v.find(',', p), v.size());
                o.mode_rates.push_back(std::strtoull(v.substr(p, c - p).c_str(), nullptr, 10));
                p = c + 1;
            }
        } else if (a == "--mode-size") {
            o.mode_size = parse_size(value());
            if (o.mode_size == 0) usage("--mode-size needs a size such as 256m or 4g");
        } else if (a == "--repl-size") {
            o.repl_size = parse_size(value());
            if (o.repl_size == 0) usage("--repl-size needs a size such as 256m or 1g");
        } else if (a == "--repl-mbps") {
            o.repl_mbps = std::max(1.0, std::atof(value().c_str()));
        } else if (a == "--repl-runs") {
            o.repl_runs = std::clamp(std::atoi(value().c_str()), 1, 10);
        } else if (a == "--raw") {
            o.raw = true;
        } else if (a == "--tls") {  // the TLS rows alone (with the floors)
            o.tls = true;
            o.push = o.fault = o.throttled = o.sweep = o.downtime = o.busy = o.repl = false;
        } else if (a == "--iterations") {
            o.iterations = std::max(100, std::atoi(value().c_str()));
        } else {
            usage(("unknown argument " + a).c_str());
        }
    }
    return o;
}

// Share of the machine's CPUs that processes other than ours used between two samples;
// `ours_s` is CPU time of our live children not yet in RUSAGE_CHILDREN.
struct Load {
    double others = 0, steal = 0;  // fractions of (wall time × CPUs)
};
Load load_between(const CpuTimes& a, const CpuTimes& b, double wall_s, double ours_s) {
    const double cpus = static_cast<double>(::sysconf(_SC_NPROCESSORS_ONLN));
    Load l;
    if (wall_s <= 0) return l;
    l.others = std::max(0.0, (b.busy_s - a.busy_s) - (b.own_s - a.own_s) - ours_s) / (wall_s * cpus);
    l.steal = (b.steal_s - a.steal_s) / (wall_s * cpus);
    return l;
}

std::string load_line(const Load& l) {
    return fmt::format("other processes used {:.0f}% of the CPUs, hypervisor steal {:.0f}%{}", 100 * l.others,
                       100 * l.steal,
                       l.others > 0.05 || l.steal > 0.05 ? "  — WARNING: figures disturbed by load not ours" : "");
}

std::string loadavg() {
    std::string s;
    if (FILE* f = std::fopen("/proc/loadavg", "re")) {
        char buf[128] = {};
        if (std::fgets(buf, sizeof buf, f)) s = buf;
        std::fclose(f);
    }
    while (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
}

struct Floors {
    double rtt_p50 = 0, rtt_p99 = 0, uffd_p50 = 0, uffd_p99 = 0, minor_p50 = 0, tcp_gbps = 0, memcpy_gbps = 0;
    double remote_p50 = 0, pipeline_gbps = 0;  // what DESIGN.md's targets are judged against
    [[nodiscard]] double fault_us() const { return rtt_p50 + uffd_p50; }
};

Fields probe(Report& rep, const char* name, const std::function<Fields()>& fn) {
    Fields f = run_in_child(fn);
    if (f.has("error")) rep.line(fmt::format("  {}: ERROR {}", name, f.str("error")));
    return f;
}

Floors measure_floors(const Options& o, Report& rep) {
    rep.line("floors (measured now, on this machine)");
    const int warm = std::max(200, o.iterations / 10);
    Fields rtt = probe(rep, "tcp round trip", [&] { return floor_tcp_rtt(warm, o.iterations); });
    Fields copy = probe(rep, "uffd copy", [&] { return floor_uffd_copy(warm, o.iterations); });
    Fields minor = probe(rep, "uffd continue", [&] { return floor_uffd_continue(warm, o.iterations); });
    Fields remote = probe(rep, "remote fault", [&] { return floor_remote_fault(warm, o.iterations); });
    Fields stream = probe(rep, "tcp stream", [&] { return floor_tcp_stream(512ull << 20, (o.quick ? 2ull : 4ull) << 30); });
    Fields cold = probe(rep, "tcp stream cold", [&] { return floor_tcp_stream_cold((o.quick ? 256ull : 1024ull) << 20); });
    Fields mem = probe(rep, "memcpy", [&] { return floor_memcpy(256ull << 20, 9); });
    // The pipeline floor is the best of a few passes: a floor is what the machine can do,
    // and one pass on two shared cores is easily disturbed.
    Fields pipe;
    std::string pipe_passes;
    for (int pass = 0; pass < (o.quick ? 1 : 3); ++pass) {
        Fields p = probe(rep, "pipeline", [&] { return floor_pipeline((o.quick ? 512ull : 1024ull) << 20); });
        pipe_passes += fmt::format("{}{:.2f}", pipe_passes.empty() ? "" : ", ", p.num("pipeline_gbps"));
        if (p.num("pipeline_gbps") > pipe.num("pipeline_gbps")) pipe = p;
    }
    Floors f{rtt.num("rtt_p50_us"), rtt.num("rtt_p99_us"), copy.num("uffd_p50_us"), copy.num("uffd_p99_us"),
             minor.num("uffd_minor_p50_us"), stream.num("tcp_gbps"), mem.num("memcpy_gbps"),
             remote.num("remote_p50_us"), pipe.num("pipeline_gbps")};
    auto lat = [&](const char* what, const Fields& x, const std::string& k) {
        rep.line(fmt::format("  {:<40} p50 {:7.1f} us  p99 {:7.1f} us  p99.9 {:7.1f} us  mean {:6.1f} us  (n={})", what,
                             x.num(k + "_p50_us"), x.num(k + "_p99_us"), x.num(k + "_p999_us"), x.num(k + "_mean_us"),
                             x.num(k + "_count")));
    };
    lat("tcp round trip, 16 B request / 4 KiB reply", rtt, "rtt");
    lat("uffd fault + 1-page UFFDIO_COPY", copy, "uffd");
    lat("uffd minor fault + 4 KiB write + CONTINUE", minor, "uffd_minor");
    rep.line(fmt::format("  {:<40} {:.1f} us  (tcp rtt p50 + uffd copy p50)", "floor_fault_us", f.fault_us()));
    lat("uffd fault served by a TCP peer, raw", remote, "remote");
    rep.line(fmt::format("  {:<40} {:.2f} GB/s", "tcp stream, 1 MiB writes", f.tcp_gbps));
    rep.line(fmt::format("  {:<40} {:.2f} GB/s  (information: written region → untouched populated region)",
                         "tcp stream, cold memory each side", cold.num("tcp_cold_gbps")));
    rep.line(fmt::format("  {:<40} {:.2f} GB/s", "memcpy, populated buffers", f.memcpy_gbps));
    rep.line(fmt::format("  {:<40} {:.2f} GB/s  (pread memfd → 1 MiB sends → recv MSG_WAITALL → pwrite memfd, "
                         "two processes; best of {})",
                         "kernel-copy pipeline floor", f.pipeline_gbps, pipe_passes));
    auto& j = rep.json;
    j.num("floor_fault_us", f.fault_us());
    j.num("floor_rtt_p50_us", f.rtt_p50);
    j.num("floor_rtt_p99_us", f.rtt_p99);
    j.num("floor_rtt_p999_us", rtt.num("rtt_p999_us"));
    j.num("floor_uffd_p50_us", f.uffd_p50);
    j.num("floor_uffd_p99_us", f.uffd_p99);
    j.num("floor_uffd_p999_us", copy.num("uffd_p999_us"));
    j.num("floor_uffd_minor_p50_us", f.minor_p50);
    j.num("floor_uffd_minor_p99_us", minor.num("uffd_minor_p99_us"));
    j.num("floor_remote_fault_p50_us", remote.num("remote_p50_us"));
    j.num("floor_remote_fault_p99_us", remote.num("remote_p99_us"));
    j.num("floor_tcp_gbps", f.tcp_gbps);
    j.num("floor_tcp_cold_gbps", cold.num("tcp_cold_gbps"));
    j.num("floor_memcpy_gbps", f.memcpy_gbps);
    j.num("floor_pipeline_gbps", f.pipeline_gbps);
    return f;
}

enum class Variant { push, fault, fault_throttled };

struct RunSpec {
    std::size_t bytes;
    Backing backing;
    Variant variant;
};

// One migration of the size's source server to a fresh destination (run_migration).
Fields migrate(Child& source, const RunSpec& r, const Options& o) {
    return run_migration(source, MigrationRun{.bytes = r.bytes, .backing = r.backing,
                                              .touchers = r.variant == Variant::push ? 0 : o.touchers,
                                              .max_samples = o.samples,
                                              .max_bandwidth = r.variant == Variant::fault_throttled ? o.throttle_mbps * 1e6 : 0});
}

std::string variant_name(Variant v) {
    switch (v) {
    case Variant::push: return "push";
    case Variant::fault: return "fault";
    case Variant::fault_throttled: return "fault_throttled";
    }
    return "?";
}

}  // namespace
}  // namespace bench

int main(int argc, char** argv) {
    using namespace bench;
    const Options o = parse(argc, argv);
    (void)bench_key();  // made now, before any child forks: both ends of a run share it
    Report rep;
    utsname u{};
    ::uname(&u);
    rep.line(fmt::format("lazymig-bench: {} cpus, kernel {}, build {}, sizes {}, touchers {}, throttle {} MB/s",
                         ::sysconf(_SC_NPROCESSORS_ONLN), u.release, BENCH_BUILDTYPE,
                         [&] {
                             std::string s;
                             for (auto b : o.sizes) s += (s.empty() ? "" : ",") + size_tag(b);
                             return s;
                         }(),
                         o.touchers, o.throttle_mbps));
    rep.line("load average before the run: " + loadavg());
    const CpuTimes run0 = cpu_times();
    const std::uint64_t run_w0 = now_ns();
    double worst_others = 0;
    const Floors fl = measure_floors(o, rep);
    {
        const Load l = load_between(run0, cpu_times(), double(now_ns() - run_w0) / 1e9, 0);
        worst_others = l.others;
        rep.line("  machine during the floors: " + load_line(l));
        rep.json.num("others_cpu_floors", l.others);
    }
    bool all_ok = true;
    Json& j = rep.json;
    const std::size_t headline_size = *std::max_element(o.sizes.begin(), o.sizes.end());
    double max_downtime = 0, max_dst_overhead = 0, max_src_overhead = 0;

    const bool any_migration = o.push || o.fault || o.throttled;
    for (const Backing backing : any_migration ? o.backings : std::vector<Backing>{}) {
        const bool headline_backing = backing == o.backings.front();
        for (const std::size_t bytes : o.sizes) {
            const std::string tag = size_tag(bytes) + (headline_backing ? "" : "_" + std::string(to_string(backing)));
            const std::string title = fmt::format("{} {}", size_tag(bytes), to_string(backing));
            const bool headline = headline_backing && bytes == headline_size;
            rep.line(fmt::format("\nmigration of {} over loopback TCP, source and destination in separate processes",
                                 title));
            SourceSpec ss{bytes, backing};
            Child source = Child::spawn([&](int c, int w) { return source_server(ss, c, w); });
            auto ready = source.recv();
            if (!ready || ready->has("error")) {
                rep.line(fmt::format("  ERROR: source: {}", ready ? ready->str("error") : source.finish()));
                all_ok = false;
                continue;
            }
            rep.line(fmt::format("  source guest RAM filled in {:.0f} ms", ready->num("fill_ms")));
            for (const Variant v : {Variant::push, Variant::fault, Variant::fault_throttled}) {
                if ((v == Variant::push && !o.push) || (v == Variant::fault && !o.fault) ||
                    (v == Variant::fault_throttled && !o.throttled))
                    continue;
                const CpuTimes c0 = cpu_times();
                const double s0 = process_cpu_s(source.pid());
                const std::uint64_t w0 = now_ns();
                Fields f = migrate(source, {bytes, backing, v}, o);
                const Load load = load_between(c0, cpu_times(), double(now_ns() - w0) / 1e9,
                                               process_cpu_s(source.pid()) - s0);
                worst_others = std::max(worst_others, load.others);
                const std::string sfx = tag + (v == Variant::fault_throttled ? "_throttled" : "");
                const bool ok = !f.has("error") && f.num("verify_errors", 1) == 0 && f.num("touch_errors") == 0;
                all_ok = all_ok && ok;
                const double downtime = f.num("src_downtime_ms");
                const double dst_ovh = f.num("dst_overhead_peak_bytes"), src_ovh = f.num("src_overhead_peak_bytes");
                if (headline_backing) {
                    max_downtime = std::max(max_downtime, downtime);
                    if (bytes == headline_size) {
                        max_dst_overhead = std::max(max_dst_overhead, dst_ovh);
                        max_src_overhead = std::max(max_src_overhead, src_ovh);
                    }
                }
                report_run(rep, f, RunLabels{.title = title, .size_tag = size_tag(bytes), .tag = tag, .sfx = sfx,
                                             .variant = variant_name(v), .push = v == Variant::push,
                                             .throttled = v == Variant::fault_throttled, .headline = headline,
                                             .touchers = o.touchers, .throttle_mbps = o.throttle_mbps,
                                             .floor_fault_us = fl.remote_p50, .floor_push_gbps = fl.pipeline_gbps});
                const std::string vs = v == Variant::push ? "" : "_" + variant_name(v);
                rep.line("      machine: " + load_line(load));
                if (o.raw) rep.line("      raw: " + f.line());
                j.num("others_cpu_" + tag + vs, load.others);
                if (f.has("error")) rep.line("      ERROR: " + f.str("error"));
                else if (!ok) rep.line("      ERROR: guest memory on the destination differs from the source");
            }
            if (headline && o.sweep)
                all_ok = bulk_channel_sweep(rep, source, bytes, backing, {1, 2, 4}, fl.pipeline_gbps) && all_ok;
            source.send(Fields().set_str("quit", "1"));
            source.finish();
        }
    }
    if (o.tls) {
        SourceSpec ss{headline_size, o.backings.front()};
        Child source = Child::spawn([&](int c, int w) { return source_server(ss, c, w); });
        auto ready = source.recv();
        if (!ready || ready->has("error")) {
            rep.line(fmt::format("  ERROR: source: {}", ready ? ready->str("error") : source.finish()));
            all_ok = false;
        } else {
            all_ok = tls_rows(rep, source, headline_size, o.backings.front(), std::max(1, o.touchers), o.samples) && all_ok;
            source.send(Fields().set_str("quit", "1"));
        }
        source.finish();
    }
    if (o.downtime) all_ok = downtime_series(rep, (o.quick ? 32ull : 64ull) << 20, o.quick ? 10 : 20) && all_ok;
    if (o.busy) all_ok = report_busy_guest(rep, o.quick ? 256ull << 20 : 4ull << 30) && all_ok;
    if (o.modes) all_ok = report_modes(rep, o.mode_size, o.mode_rates) && all_ok;
    if (o.repl) all_ok = report_replication(rep, o.repl_size, o.repl_mbps, o.repl_runs) && all_ok;

    j.num("downtime_ms", max_downtime);
    j.num("mem_overhead_bytes", max_dst_overhead);
    j.num("mem_overhead_bound_bytes", double(destination_bound(headline_size)));
    j.num("src_mem_overhead_bytes", max_src_overhead);
    j.num("src_mem_overhead_bound_bytes", double(source_bound(headline_size)));
    j.str("headline", fmt::format("{} {}", size_tag(headline_size), to_string(o.backings.front())));
    j.num("others_cpu_worst", worst_others);
    j.boolean("disturbed", worst_others > 0.05);
    j.boolean("all_targets_met", rep.all_met());
    j.boolean("all_migrations_correct", all_ok);
    rep.summary();
    if (worst_others > 0.05)
        rep.line(fmt::format("WARNING: other processes used up to {:.0f}% of the CPUs during this run; on 2 cores "
                             "that moves every figure: rerun on an idle machine before trusting them",
                             100 * worst_others));
    if (!all_ok) rep.line("\nERROR: at least one migration failed or left wrong memory (see ERROR lines above)");
    std::printf("%s\n", j.dump().c_str());
    return all_ok ? 0 : 1;
}
