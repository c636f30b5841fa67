// The busy-guest run: real lazymig-vmm processes, one migration, progress measured
// through query-status before and during post-copy.
#include "bench/busy_guest.hpp"

#include <fmt/format.h>

namespace bench {

bool report_busy_guest(Report& rep, std::size_t bytes) {
    rep.line(fmt::format("\nbusy guest: lazymig-vmm, {} MiB memfd, 1 vCPU running `pattern` unpaced (--rate 0), "
                         "post-copy at once",
                         bytes >> 20));
    const Fields f = run_in_child([&] { return busy_guest_run(bytes); });
    Json& j = rep.json;
    if (f.has("skipped")) {
        rep.line("  skipped: " + f.str("skipped"));
        j.num("blocktime_ms", 0);
        return true;
    }
    if (f.has("error")) rep.line("  ERROR: " + f.str("error"));
    if (!f.has("busy_total_ms")) return false;
    const double before = f.num("busy_rate_before"), during = f.num("busy_rate_during");
    rep.line(fmt::format("  total {:.0f} ms (post-copy {:.0f} ms, downtime {:.2f} ms); faults {}, pages demanded {}, "
                         "pushed {}; fault p50 {:.1f} us p99 {:.1f} us",
                         f.num("busy_total_ms"), f.num("busy_postcopy_ms"), f.num("busy_downtime_ms"),
                         f.num("busy_faults"), f.num("busy_pages_demanded"), f.num("busy_pages_pushed"),
                         f.num("busy_fault_p50_us"), f.num("busy_fault_p99_us")));
    rep.line(fmt::format("  blocktime {:.1f} ms{}", f.num("busy_blocktime_ms"),
                         f.num("busy_blocktime_reported") ? "" : " (not reported by this lazymig-vmm)"));
    rep.line(fmt::format("  guest progress: {:.2f} M pages/s during post-copy vs {:.2f} M pages/s before = {:.0f}%",
                         during / 1e6, before / 1e6, before > 0 ? 100 * during / before : 0.0));
    rep.line(fmt::format("  (boot of both VMs {:.1f} s; check-workload {})", f.num("busy_boot_s"),
                         f.num("busy_check_ok") ? "ok" : "FAILED"));
    for (const char* k : {"busy_total_ms", "busy_postcopy_ms", "busy_downtime_ms", "busy_faults", "busy_pages_demanded",
                          "busy_pages_pushed", "busy_blocktime_ms", "busy_fault_p50_us", "busy_fault_p99_us",
                          "busy_rate_before", "busy_rate_during"})
        j.num(k, f.num(k));
    j.num("busy_progress_ratio", before > 0 ? during / before : 0);
    j.num("blocktime_ms", f.num("busy_blocktime_ms"));
    return !f.has("error") && f.num("busy_check_ok") != 0;
}

}  // namespace bench

#ifdef BENCH_VMM
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "bench/vm_process.hpp"
#include "qmp_client.hpp"

namespace bench {
namespace {

Fields run(const std::string& dir, std::size_t bytes) {
    const std::vector<std::string> common{"--memory", fmt::format("{}M", bytes >> 20), "--vcpus", "1",
                                          "--workload", "pattern", "--rate", "0", "--backing", "memfd"};
    std::string err;
    auto dst_args = common;
    dst_args.insert(dst_args.end(), {"--incoming", "tcp:127.0.0.1:0"});
    auto dst = Vm::start(dir, "dst", dst_args, &err);
    if (!dst) return Fields().set_str("error", "busy guest: " + err);
    const auto boot0 = std::chrono::steady_clock::now();
    auto src = Vm::start(dir, "src", common, &err);
    if (!src) return Fields().set_str("error", "busy guest: " + err);
    const double boot_s = seconds_since(boot0);
    auto sc = vmm::QmpClient::connect(src->qmp);
    auto dc = vmm::QmpClient::connect(dst->qmp);
    if (!sc || !dc) return Fields().set_str("error", "busy guest: cannot connect to the management sockets");
    auto fail = [](const char* what, const lazymig::Error& e) {
        return Fields().set_str("error", fmt::format("busy guest: {}: {}", what, e.message()));
    };
    // Both clients negotiated QMP capabilities on connect, so they receive events.

    // Guest progress before: pattern pages/s over one second of the running source.
    const auto ops = guest_ops;
    const auto before = guest_rate(*sc);
    if (!before) return Fields().set_str("error", "busy guest: query-status failed");
    const double rate_before = *before;

    const auto m0 = std::chrono::steady_clock::now();
    if (auto r = sc->execute("migrate", {{"uri", dst->incoming}, {"mode", "postcopy"}}); !r) return fail("migrate", r.error());
    auto status_is = [](const char* s) { return [s](const json& e) { return e["data"].value("status", "") == s; }; };
    auto resumed = dc->wait_event("MIGRATION", status_is("postcopy-active"), 120s);  // QEMU's name
    if (!resumed) return fail("waiting for the destination to resume", resumed.error());
    const auto r0 = std::chrono::steady_clock::now();
    auto done = dc->wait_event("MIGRATION", [](const json& e) {
        const std::string s = e["data"].value("status", "");
        return s == "completed" || s == "failed" || s == "cancelled";
    }, 600s);
    if (!done) return fail("waiting for the destination to complete", done.error());
    const auto ops_dst = ops(*dc);  // the guest's work since it resumed here
    const double during_s = seconds_since(r0);
    const double total_wall_s = seconds_since(m0);
    auto dq = dc->execute("query-migrate");
    auto se = sc->wait_event("MIGRATION", [](const json& e) {
        const std::string s = e["data"].value("status", "");
        return s == "completed" || s == "failed" || s == "cancelled";
    }, 120s);
    auto sq = sc->execute("query-migrate");
    if (!dq || !sq || !se || !ops_dst) return Fields().set_str("error", "busy guest: query-migrate failed");
    Fields f;
    const std::string phase = dq->value("phase", "?");
    if (phase != "completed") f.set_str("error", "busy guest: destination " + phase + ": " + dq->value("error", ""));
    auto check = dc->execute("check-workload");
    const bool check_ok = check && check->value("ok", false);
    if (!check_ok && !f.has("error"))
        f.set_str("error", "busy guest: check-workload: " + (check ? check->value("detail", "") : check.error().message()));
    f.set("busy_boot_s", boot_s)
        .set("busy_total_ms", num(*sq, {"elapsed-ms"}))
        .set("busy_wall_ms", total_wall_s * 1e3)
        .set("busy_postcopy_ms", num(*dq, {"postcopy-ms"}))
        .set("busy_downtime_ms", num(*sq, {"downtime-ms"}))
        .set("busy_faults", num(*dq, {"faults"}))
        .set("busy_pages_demanded", num(*dq, {"pages", "demanded"}))
        .set("busy_pages_pushed", num(*dq, {"pages", "pushed"}))
        .set("busy_blocktime_ms", num(*dq, {"blocktime-ms"}))
        .set("busy_blocktime_reported", std::uint64_t(dq->contains("blocktime-ms")))
        .set("busy_fault_p50_us", num(*dq, {"fault-latency-us", "p50"}))
        .set("busy_fault_p99_us", num(*dq, {"fault-latency-us", "p99"}))
        .set("busy_rate_before", rate_before)
        .set("busy_rate_during", *ops_dst / during_s)
        .set("busy_check_ok", std::uint64_t(check_ok));
    (void)sc->call("quit");
    (void)dc->call("quit");
    src->wait_exit();
    dst->wait_exit();
    return f;
}

}  // namespace

Fields busy_guest_run(std::size_t bytes) {
    return in_scratch_dir("busy guest", [&](const std::string& dir) { return run(dir, bytes); });
}

}  // namespace bench

#else  // lazymig-vmm not built (examples disabled): nothing to drive

namespace bench {
Fields busy_guest_run(std::size_t) { return Fields().set_str("skipped", "lazymig-vmm was not built"); }
}  // namespace bench

#endif
