// The back-replication overhead table: a long hybrid post-copy with epochs on and off.
#include "bench/replication.hpp"

#include <fmt/format.h>

#include "bench/common.hpp"

namespace bench {

Fields replication_run(std::size_t bytes, double mbps, bool epochs);

bool report_replication(Report& rep, std::size_t bytes, double mbps, int runs) {
    rep.line(fmt::format("\nback-replication overhead: lazymig-vmm, {} MiB memfd, 1 vCPU running `dirty` unpaced (zipf "
                         "over a 25% working set); hybrid, one pre-copy round, then the push throttled to {:.0f} MB/s from "
                         "the resume on, so that post-copy lasts; epochs every 50 ms vs --epoch-ms 0",
                         bytes >> 20, mbps));
    rep.line(fmt::format("  {:<10} {:>9} {:>11} {:>10} {:>8} {:>10} {:>10} {:>7} {:>7} {:>13} {:>13} {:>7}", "epochs",
                         "total ms", "postcopy ms", "floor ms", "stale", "Mops/s pc", "Mops/s pre", "guest%", "epochs",
                         "pause p50/p99", "commit p50/99", "pages"));
    rep.line("  (floor ms: stale pages / throttle, what the throttled link needs for them — demand replies are not "
             "throttled; Mops/s pre: the same guest just before migrate, no migration: its floor in this run; "
             "guest% = post-copy rate / that)");
    bool ok = true;
    double sum_on = 0, sum_off = 0, total_on = 0, total_off = 0;
    int n_on = 0, n_off = 0;
    for (int run = 0; run < runs; ++run) {
        for (const bool epochs : {true, false}) {
            const Fields f = run_in_child([&] { return replication_run(bytes, mbps, epochs); });
            if (f.has("skipped")) {
                rep.line("  skipped: " + f.str("skipped"));
                return true;
            }
            const double before = f.num("rate_before"), during = f.num("rate_postcopy");
            const double share = before > 0 ? during / before : 0;
            rep.line(fmt::format("  {:<10} {:>9.0f} {:>11.0f} {:>10.0f} {:>8.0f} {:>10.3f} {:>10.3f} {:>6.1f}% {:>7.0f} "
                                 "{:>6.2f}/{:<6.2f} {:>6.1f}/{:<6.1f} {:>7.0f}",
                                 epochs ? "on (50 ms)" : "off", f.num("total_ms"), f.num("postcopy_ms"),
                                 f.num("floor_ms"), f.num("stale"), during / 1e6, before / 1e6, 100 * share,
                                 f.num("epochs"), f.num("pause_p50_ms"), f.num("pause_p99_ms"), f.num("commit_p50_ms"),
                                 f.num("commit_p99_ms"), f.num("epoch_pages")));
            if (epochs && f.has("steps_epochs"))
                rep.line(fmt::format(
                    "    pause steps p50/p99 ms: park {:.2f}/{:.2f}, scan {:.2f}/{:.2f}, scan+copy again {:.2f}/{:.2f}, "
                    "stage rest {:.2f}/{:.2f}, resume {:.2f}/{:.2f}; running passes {:.2f}/{:.2f} (their scans "
                    "{:.2f}/{:.2f}); pages copied running {:.0f}, paused {:.0f}; {:.0f} epochs larger than the "
                    "staging area (paused while it was sent), {:.0f} ticks skipped (4 epochs unacknowledged)",
                    f.num("park_p50"), f.num("park_p99"), f.num("scan_p50"), f.num("scan_p99"),
                    f.num("scan_copy_again_p50"), f.num("scan_copy_again_p99"), f.num("stage_rest_p50"),
                    f.num("stage_rest_p99"), f.num("unpark_p50"), f.num("unpark_p99"), f.num("running_passes_p50"),
                    f.num("running_passes_p99"), f.num("running_scan_p50"), f.num("running_scan_p99"),
                    f.num("pages_prestaged"), f.num("pages_paused"), f.num("overflows"), f.num("ticks_skipped")));
            if (f.has("error")) rep.line("    ERROR: " + f.str("error"));
            ok = ok && !f.has("error");
            (epochs ? sum_on : sum_off) += share;
            (epochs ? total_on : total_off) += f.num("total_ms");
            ++(epochs ? n_on : n_off);
            const std::string key = fmt::format("repl_{}_{}_", epochs ? "on" : "off", run);
            for (const char* k : {"total_ms", "postcopy_ms", "floor_ms", "stale", "rate_before", "rate_postcopy",
                                  "epochs", "pause_p50_ms", "pause_p99_ms", "commit_p50_ms", "commit_p99_ms",
                                  "epoch_pages", "overflows"})
                rep.json.num(key + k, f.num(k));
        }
    }
    if (n_on > 0 && n_off > 0) {
        const double on = sum_on / n_on, off = sum_off / n_off;
        rep.line(fmt::format("  mean of {} run(s) each: during post-copy the guest ran at {:.1f}% of its pre-migration "
                             "rate with epochs, {:.1f}% without (ratio on/off {:.2f}); total migration {:.0f} ms with "
                             "epochs, {:.0f} ms without",
                             n_on, 100 * on, 100 * off, off > 0 ? on / off : 0.0, total_on / n_on, total_off / n_off));
        rep.json.num("repl_guest_share_on", on);
        rep.json.num("repl_guest_share_off", off);
        rep.json.num("repl_total_ms_on", total_on / n_on);
        rep.json.num("repl_total_ms_off", total_off / n_off);
    }
    return ok;
}

}  // namespace bench

#ifdef BENCH_VMM
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "bench/vm_process.hpp"
#include "qmp_client.hpp"

namespace bench {
namespace {

// The destination's replicator_pause_steps line (pager/replicator.cpp, logged at info when
// replication stops): "key=p50/p99" per step, "key=n" per count.
void pause_steps(const std::string& log, Fields& f) {
    std::ifstream in(log);
    std::string line, last;
    while (std::getline(in, line))
        if (line.find("replicator_pause_steps") != std::string::npos) last = line;
    std::istringstream words(last);
    for (std::string w; words >> w;) {
        const auto eq = w.find('=');
        if (eq == std::string::npos) continue;
        const std::string k = w.substr(0, eq), v = w.substr(eq + 1);
        const auto slash = v.find('/');
        if (slash == std::string::npos) {
            f.set(k == "epochs" ? "steps_epochs" : k, std::atof(v.c_str()));
        } else {
            f.set(k + "_p50", std::atof(v.substr(0, slash).c_str()));
            f.set(k + "_p99", std::atof(v.substr(slash + 1).c_str()));
        }
    }
}

Fields run(const std::string& dir, std::size_t bytes, double mbps, bool epochs) {
    // Info lines go to the VMs' logs (in `dir`): the destination's pause breakdown.
    if (epochs) ::setenv("LAZYMIG_LOG", "info", 1);
    std::vector<std::string> common{"--memory", fmt::format("{}M", bytes >> 20), "--vcpus", "1", "--backing", "memfd",
                                    "--workload", "dirty", "--rate", "0", "--pattern", "zipf", "--working-set", "25%"};
    if (!epochs) common.insert(common.end(), {"--epoch-ms", "0"});
    std::string err;
    auto pair = start_pair(dir, common, "replication", &err);
    if (!pair) return Fields().set_str("error", err);
    auto& [src, dst, sc, dc] = *pair;
    auto fail = [](const char* what, const lazymig::Error& e) {
        return Fields().set_str("error", fmt::format("replication: {}: {}", what, e.message()));
    };
    const auto ops = guest_ops;
    const auto before = guest_rate(*sc);
    if (!before) return Fields().set_str("error", "replication: query-status failed");
    const double rate_before = *before;

    // One full-speed round, then post-copy whatever the round left dirty.
    if (auto r = sc->execute("migrate-set-parameters", {{"max-rounds", 1}, {"downtime-limit", 1}}); !r)
        return fail("migrate-set-parameters", r.error());
    if (auto r = sc->execute("migrate", {{"uri", dst->incoming}, {"mode", "hybrid"}}); !r) return fail("migrate", r.error());
    auto status_is = [](const char* s) { return [s](const json& e) { return e["data"].value("status", "") == s; }; };
    auto terminal = [](const json& e) {
        const std::string s = e["data"].value("status", "");
        return s == "completed" || s == "failed" || s == "cancelled";
    };
    auto resumed = dc->wait_event("MIGRATION", status_is("postcopy-active"), 600s);
    if (!resumed) return fail("waiting for the destination to resume", resumed.error());
    const auto r0 = std::chrono::steady_clock::now();
    const auto ops_r0 = ops(*dc);
    if (auto r = sc->execute("migrate-set-parameters", {{"max-bandwidth", static_cast<std::uint64_t>(mbps * 1e6)}}); !r)
        return fail("migrate-set-parameters max-bandwidth", r.error());
    auto done = dc->wait_event("MIGRATION", terminal, 600s);
    if (!done) return fail("waiting for the destination to finish", done.error());
    const auto ops_end = ops(*dc);
    const double during_s = seconds_since(r0);
    auto se = sc->wait_event("MIGRATION", terminal, 120s);
    if (!se) return fail("waiting for the source to finish", se.error());
    auto dq = dc->execute("query-migrate");
    auto sq = sc->execute("query-migrate");
    if (!dq || !sq || !ops_r0 || !ops_end) return Fields().set_str("error", "replication: query failed");
    Fields f;
    const std::string phase = dq->value("phase", "?");
    if (phase != "completed") f.set_str("error", "replication: destination " + phase + ": " + dq->value("error", ""));
    const json pre = sq->contains("precopy") ? (*sq)["precopy"] : json::object();
    const double stale = num(pre, {"stale-pages"});
    f.set("total_ms", num(*sq, {"elapsed-ms"}))
        .set("postcopy_ms", num(*dq, {"postcopy-ms"}))
        .set("stale", stale)
        .set("floor_ms", stale * 4096 / (mbps * 1e6) * 1e3)
        .set("rate_before", rate_before)
        .set("rate_postcopy", during_s > 0 ? (*ops_end - *ops_r0) / during_s : 0);
    if (dq->contains("replication")) {
        const json& r = (*dq)["replication"];
        f.set("epochs", num(r, {"epochs"}))
            .set("epoch_pages", num(r, {"pages"}))
            .set("pause_p50_ms", num(r, {"pause-ms", "p50"}))
            .set("pause_p99_ms", num(r, {"pause-ms", "p99"}))
            .set("commit_p50_ms", num(r, {"commit-ms", "p50"}))
            .set("commit_p99_ms", num(r, {"commit-ms", "p99"}))
            .set("overflows", num(r, {"overflows"}))
            .set("ticks_skipped", num(r, {"skipped"}));
    }
    if (!f.has("error")) {
        auto check = dc->execute("check-workload");
        if (!check || !check->value("ok", false))
            f.set_str("error",
                      "replication: check-workload: " + (check ? check->value("detail", "") : check.error().message()));
    }
    (void)sc->call("quit");
    (void)dc->call("quit");
    src->wait_exit();
    dst->wait_exit();
    if (epochs) pause_steps(dst->log, f);
    return f;
}

}  // namespace

Fields replication_run(std::size_t bytes, double mbps, bool epochs) {
    return in_scratch_dir("replication", [&](const std::string& dir) { return run(dir, bytes, mbps, epochs); });
}

}  // namespace bench

#else  // lazymig-vmm not built (examples disabled): nothing to drive

namespace bench {
Fields replication_run(std::size_t, double, bool) { return Fields().set_str("skipped", "lazymig-vmm was not built"); }
}  // namespace bench

#endif
