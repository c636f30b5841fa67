// The modes table: postcopy, precopy and hybrid on a guest dirtying at a set rate.
#include "bench/modes.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "bench/common.hpp"

namespace bench {

Fields modes_run(std::size_t bytes, std::uint64_t rate, const std::string& mode);

bool report_modes(Report& rep, std::size_t bytes, const std::vector<std::uint64_t>& rates) {
    rep.line(fmt::format("\nmodes: lazymig-vmm, {} MiB memfd, 1 vCPU running `dirty` (uniform random) at a set rate; "
                         "downtime-limit 50 ms, max 30 rounds, 120 s",
                         bytes >> 20));
    rep.line(fmt::format("  {:>8} {:<13} {:<9} {:>9} {:>10} {:>9} {:>9} {:>8} {:>6} {:>7} {:>8} {:>8}  {}", "pages/s",
                         "mode", "result", "total ms", "downtime", "wire MB", "resent", "stale", "lost%", "faults",
                         "p50 us", "p99 us", "switchover"));
    bool ok = true;
    for (const auto rate : rates) {
        // hybrid-norepl: hybrid with back-replication off (--epoch-ms 0 on both VMs), the
        // row the replication overhead is read against.
        for (const std::string mode : {"postcopy", "precopy", "hybrid", "hybrid-norepl"}) {
            const Fields f = run_in_child([&] { return modes_run(bytes, rate, mode); });
            if (f.has("skipped")) {
                rep.line("  skipped: " + f.str("skipped"));
                return true;
            }
            const std::string result = f.has("result") ? f.str("result") : "error";
            std::string switchover = f.has("switchover") ? f.str("switchover") : "";
            std::replace(switchover.begin(), switchover.end(), '_', ' ');  // the field's encoding of spaces
            rep.line(fmt::format("  {:>8} {:<13} {:<9} {:>9.0f} {:>10.2f} {:>9.1f} {:>9.0f} {:>8.0f} {:>6.1f} {:>7.0f} "
                                 "{:>8.1f} {:>8.1f}  {}",
                                 rate, mode, result, f.num("total_ms"), f.num("downtime_ms"), f.num("bytes") / 1e6,
                                 f.num("resent"), f.num("stale"), 100 * f.num("lost"), f.num("faults"), f.num("p50_us"),
                                 f.num("p99_us"), switchover));
            if (f.has("error")) rep.line("    ERROR: " + f.str("error"));
            if (mode == "hybrid" && f.has("epochs"))
                rep.line(fmt::format("    back-replication: {:.0f} epochs, {:.0f} pages, pause p50 {:.2f} ms p99 {:.2f} ms "
                                     "(target p99 <= 2 ms at 10k pages; largest epoch {:.0f} pages), commit p50 {:.2f} ms "
                                     "p99 {:.2f} ms, {:.0f} staging overflows",
                                     f.num("epochs"), f.num("epoch_pages"), f.num("pause_p50_ms"), f.num("pause_p99_ms"),
                                     f.num("epoch_largest"), f.num("commit_p50_ms"), f.num("commit_p99_ms"),
                                     f.num("overflows")));
            const std::string key = fmt::format("modes_{}_{}_", mode, rate);
            for (const char* k : {"total_ms", "downtime_ms", "bytes", "resent", "stale", "lost", "faults", "p50_us",
                                  "p99_us", "rounds", "discard_ms", "epochs", "pause_p99_ms", "commit_p99_ms"})
                rep.json.num(key + k, f.num(k));
            rep.json.boolean(key + "completed", result == "completed");
            // A precopy that gives up is a designed outcome; anything else must complete.
            const bool gave_up = mode == "precopy" && result == "failed" && !f.has("error");
            ok = ok && (result == "completed" || gave_up);
        }
    }
    return ok;
}

}  // namespace bench

#ifdef BENCH_VMM
#include <cstdlib>
#include <filesystem>
#include <optional>

#include "bench/vm_process.hpp"
#include "qmp_client.hpp"

namespace bench {
namespace {

Fields run(const std::string& dir, std::size_t bytes, std::uint64_t rate, const std::string& row) {
    const bool norepl = row == "hybrid-norepl";
    const std::string mode = norepl ? "hybrid" : row;
    // Rate 0 is the `idle` workload (the dirty workload takes --rate 0 as unpaced).
    std::vector<std::string> common{"--memory", fmt::format("{}M", bytes >> 20), "--vcpus", "1", "--backing", "memfd"};
    if (norepl) common.insert(common.end(), {"--epoch-ms", "0"});
    if (rate == 0) common.insert(common.end(), {"--workload", "idle"});
    else common.insert(common.end(), {"--workload", "dirty", "--rate", std::to_string(rate), "--pattern", "random"});
    std::string err;
    auto pair = start_pair(dir, common, "modes", &err);
    if (!pair) return Fields().set_str("error", err);
    auto& [src, dst, sc, dc] = *pair;
    auto fail = [](const char* what, const lazymig::Error& e) {
        return Fields().set_str("error", fmt::format("modes: {}: {}", what, e.message()));
    };
    const auto ops = guest_ops;
    const auto before = guest_rate(*sc);
    if (!before) return Fields().set_str("error", "modes: query-status failed");
    const double rate_before = *before;

    if (auto r = sc->execute("migrate-set-parameters", {{"downtime-limit", 50}, {"max-rounds", 30},
                                                        {"max-precopy-ms", 120000}});
        !r)
        return fail("migrate-set-parameters", r.error());
    const auto m0 = std::chrono::steady_clock::now();
    const auto ops_m0 = ops(*sc);
    if (auto r = sc->execute("migrate", {{"uri", dst->incoming}, {"mode", mode}}); !r) return fail("migrate", r.error());
    auto terminal = [](const json& e) {
        const std::string s = e["data"].value("status", "");
        return s == "completed" || s == "failed" || s == "cancelled";
    };
    auto se = sc->wait_event("MIGRATION", terminal, 600s);
    if (!se) return fail("waiting for the source to finish", se.error());
    auto sq = sc->execute("query-migrate");
    if (!sq) return fail("query-migrate", sq.error());
    Fields f;
    const std::string result = sq->value("phase", "?");
    f.set_str("result", result);
    const json pre = sq->contains("precopy") ? (*sq)["precopy"] : json::object();
    if (pre.contains("switchover")) f.set_str("switchover", pre.value("switchover", "").substr(0, 48));
    f.set("total_ms", num(*sq, {"elapsed-ms"}))
        .set("downtime_ms", num(*sq, {"downtime-ms"}))
        .set("bytes", num(*sq, {"bytes", "sent"}))
        .set("resent", num(pre, {"pages-resent"}))
        .set("stale", num(pre, {"stale-pages"}))
        .set("rounds", double(pre.contains("rounds") ? pre["rounds"].size() : 0));
    if (result == "completed") {
        auto de = dc->wait_event("MIGRATION", terminal, 600s);
        if (!de) return fail("waiting for the destination to complete", de.error());
        const double window = seconds_since(m0);
        const auto src_end = ops(*sc), dst_end = ops(*dc);
        auto dq = dc->execute("query-migrate");
        if (!dq || !src_end || !dst_end || !ops_m0) return Fields().set_str("error", "modes: query failed");
        const double done = (*src_end - *ops_m0) + *dst_end;
        f.set("lost", rate_before > 0 ? std::max(0.0, 1 - done / (rate_before * window)) : 0)
            .set("faults", num(*dq, {"faults"}))
            .set("p50_us", num(*dq, {"fault-latency-us", "p50"}))
            .set("p99_us", num(*dq, {"fault-latency-us", "p99"}))
            .set("discard_ms", num(*dq, {"precopy", "discard-ms"}));
        if (dq->contains("replication")) {
            const json& r = (*dq)["replication"];
            f.set("epochs", num(r, {"epochs"}))
                .set("epoch_pages", num(r, {"pages"}))
                .set("epoch_largest", num(r, {"largest-pages"}))
                .set("pause_p50_ms", num(r, {"pause-ms", "p50"}))
                .set("pause_p99_ms", num(r, {"pause-ms", "p99"}))
                .set("commit_p50_ms", num(r, {"commit-ms", "p50"}))
                .set("commit_p99_ms", num(r, {"commit-ms", "p99"}))
                .set("overflows", num(r, {"overflows"}));
        }
        auto check = dc->execute("check-workload");
        if (!check || !check->value("ok", false))
            f.set_str("error", "modes: check-workload: " + (check ? check->value("detail", "") : check.error().message()));
    } else if (mode != "precopy") {
        f.set_str("error", "modes: " + mode + " ended " + result + ": " + sq->value("error", ""));
    } else {
        // Pre-copy gave up: the VM must still run at the source, whole.
        auto st = sc->execute("query-status");
        if (!st || st->value("status", "") != "running") f.set_str("error", "modes: precopy gave up but the VM is not running");
    }
    (void)sc->call("quit");
    (void)dc->call("quit");
    src->wait_exit();
    dst->wait_exit();
    return f;
}

}  // namespace

Fields modes_run(std::size_t bytes, std::uint64_t rate, const std::string& mode) {
    return in_scratch_dir("modes", [&](const std::string& dir) { return run(dir, bytes, rate, mode); });
}

}  // namespace bench

#else  // lazymig-vmm not built (examples disabled): nothing to drive

namespace bench {
Fields modes_run(std::size_t, std::uint64_t, const std::string&) {
    return Fields().set_str("skipped", "lazymig-vmm was not built");
}
}  // namespace bench

#endif
