// One migration's table lines, target checks and JSON keys.
#include "bench/results.hpp"

#include <fmt/format.h>

namespace bench {

void report_run(Report& rep, const Fields& f, const RunLabels& r) {
    Json& j = rep.json;
    const double downtime = f.num("src_downtime_ms");
    const double dst_ovh = f.num("dst_overhead_peak_bytes"), src_ovh = f.num("src_overhead_peak_bytes");
    const double dbound = f.num("dst_bound_bytes"), sbound = f.num("src_bound_bytes");
    if (r.push) {
        rep.line(fmt::format("  push, nothing touches the destination: {:.2f} GB/s, {:.0f} k pages/s "
                             "({} in {:.1f} ms from resume to last page)",
                             f.num("push_gbps"), f.num("push_pages_per_s") / 1e3, r.size_tag,
                             f.num("dst_postcopy_ms")));
        const double ratio = f.num("push_gbps") / r.floor_push_gbps;
        rep.check("push " + r.title, fmt::format("{:.2f} GB/s = {:.2f} x pipeline {:.2f}", f.num("push_gbps"),
                                               ratio, r.floor_push_gbps),
                  fmt::format(">= {:.2f} x", kPushRatio), ratio >= kPushRatio);
        j.num("push_gbps_" + r.sfx, f.num("push_gbps"));
        j.num("push_pages_per_s_" + r.sfx, f.num("push_pages_per_s"));
        j.num("push_ratio_" + r.sfx, ratio);
        if (r.headline) {
            j.num("push_gbps", f.num("push_gbps"));
            j.num("push_pages_per_s", f.num("push_pages_per_s"));
        }
    } else {
        const bool thr = r.throttled;
        rep.line(fmt::format("  demand faults, {} touch thread(s), pusher {}: n={} faulting touches in "
                             "{:.2f} s ({} pages found present and skipped)",
                             r.touchers, thr ? fmt::format("throttled to {} MB/s", r.throttle_mbps)
                                             : std::string("unthrottled"),
                             f.num("touch_count"), f.num("touch_seconds"), f.num("touch_skipped_present")));
        rep.line(fmt::format("      touch latency (vCPU view)   p50 {:7.1f} us  p99 {:7.1f} us  p99.9 "
                             "{:7.1f} us  max {:7.1f} us  mean {:6.1f} us",
                             f.num("touch_p50_us"), f.num("touch_p99_us"), f.num("touch_p999_us"),
                             f.num("touch_max_us"), f.num("touch_mean_us")));
        rep.line(fmt::format("      library fault_latency       p50 {:7.1f} us  p99 {:7.1f} us  p99.9 "
                             "{:7.1f} us  (n={}, fault read → page placed)",
                             f.num("lib_fault_p50_us"), f.num("lib_fault_p99_us"),
                             f.num("lib_fault_p999_us"), f.num("lib_fault_count")));
        rep.line(fmt::format("      faults {} requests {} demanded pages {} duplicates {}; whole "
                             "post-copy {:.1f} ms ({:.2f} GB/s); blocktime {:.1f} ms",
                             f.num("dst_faults"), f.num("dst_requests"), f.num("dst_pages_demanded"),
                             f.num("dst_duplicate_pages"), f.num("dst_postcopy_ms"), f.num("push_gbps"),
                             f.num("dst_blocktime_ms")));
        const double r50 = f.num("touch_p50_us") / r.floor_fault_us, r99 = f.num("touch_p99_us") / r.floor_fault_us;
        const std::string what = fmt::format("fault {}{}", r.title, thr ? " throttled" : "");
        rep.check(what + " p50", fmt::format("{:.1f} us = {:.2f} x raw fault {:.1f}", f.num("touch_p50_us"),
                                             r50, r.floor_fault_us),
                  fmt::format("<= {:.1f} x", kFaultP50Ratio), r50 <= kFaultP50Ratio);
        rep.check(what + " p99", fmt::format("{:.1f} us = {:.2f} x raw fault {:.1f}", f.num("touch_p99_us"),
                                             r99, r.floor_fault_us),
                  fmt::format("<= {:.1f} x", kFaultP99Ratio), r99 <= kFaultP99Ratio);
        for (const char* k : {"p50", "p99", "p999", "max", "mean"})
            j.num(fmt::format("fault_{}_us_{}", k, r.sfx), f.num(fmt::format("touch_{}_us", k)));
        j.num("fault_count_" + r.sfx, f.num("touch_count"));
        for (const char* k : {"p50", "p99", "p999"})
            j.num(fmt::format("lib_fault_{}_us_{}", k, r.sfx), f.num(fmt::format("lib_fault_{}_us", k)));
        j.num("fault_p50_ratio_" + r.sfx, r50);
        j.num("fault_p99_ratio_" + r.sfx, r99);
        j.num("faults_" + r.sfx, f.num("dst_faults"));
        j.num("demanded_pages_" + r.sfx, f.num("dst_pages_demanded"));
        j.num("fault_push_gbps_" + r.sfx, f.num("push_gbps"));
        j.num("blocktime_ms_" + r.sfx, f.num("dst_blocktime_ms"));
        if (r.headline && !thr) {
            for (const char* k : {"p50", "p99", "p999"}) {
                j.num(fmt::format("fault_{}_us", k), f.num(fmt::format("touch_{}_us", k)));
                j.num(fmt::format("lib_fault_{}_us", k), f.num(fmt::format("lib_fault_{}_us", k)));
            }
            j.num("fault_count", f.num("touch_count"));
        }
    }
    const std::string vs = r.push ? "" : "_" + r.variant;
    j.num("downtime_ms_" + r.tag + vs, downtime);
    j.num("dst_overhead_peak_bytes_" + r.tag + vs, dst_ovh);
    j.num("dst_overhead_end_bytes_" + r.tag + vs, f.num("dst_overhead_end_bytes"));
    j.num("src_overhead_peak_bytes_" + r.tag + vs, src_ovh);
    // (The downtime target is judged over many switchovers: series.hpp.)
    rep.line(fmt::format("      downtime {:.2f} ms", downtime));
    {
        // The hooks' CLOCK_MONOTONIC stamps from both processes split the downtime.
        const double p = f.num("src_paused_ns"), sv = f.num("src_saved_ns");
        const double l = f.num("dst_loaded_ns"), rs = f.num("dst_resumed_ns");
        const double end = p + downtime * 1e6;
        if (p > 0 && sv > 0 && l > 0 && rs > 0) {
            rep.line(fmt::format("      downtime split: pause→device state saved {:.2f} ms; → loaded on the "
                                 "destination {:.2f} ms; → destination resumed {:.2f} ms; → source saw "
                                 "RESUMED {:.2f} ms",
                                 (sv - p) / 1e6, (l - sv) / 1e6, (rs - l) / 1e6, (end - rs) / 1e6));
            j.num("downtime_to_dst_ms_" + r.tag + vs, (l - sv) / 1e6);
            j.num("downtime_dst_resume_ms_" + r.tag + vs, (rs - l) / 1e6);
            j.num("downtime_ack_ms_" + r.tag + vs, (end - rs) / 1e6);
        }
    }
    rep.line(fmt::format("      memory: destination peak {} beyond guest RAM ({} at the end; anon +{}, "
                         "shmem +{}), bound {}; source peak {}, bound {}",
                         mib(dst_ovh), mib(f.num("dst_overhead_end_bytes")),
                         mib(f.num("dst_anon_growth_bytes")), mib(f.num("dst_shmem_growth_bytes")),
                         mib(dbound), mib(src_ovh), mib(sbound)));
    rep.check(fmt::format("memory dst {} {}", r.title, r.variant),
              fmt::format("{} (bound {})", mib(dst_ovh), mib(dbound)),
              fmt::format("<= bound + {}", mib(kOverheadSlack)), dst_ovh <= dbound + kOverheadSlack);
    rep.check(fmt::format("memory src {} {}", r.title, r.variant),
              fmt::format("{} (bound {})", mib(src_ovh), mib(sbound)),
              fmt::format("<= bound + {}", mib(kOverheadSlack)), src_ovh <= sbound + kOverheadSlack);
    rep.line(fmt::format("      source: pushed {} demanded {} in {} requests, {} zero pages, {:.2f} GB sent; "
                         "destination listen {:.0f} ms; verify errors {}",
                         f.num("src_pages_pushed"), f.num("src_pages_demanded"), f.num("src_requests"),
                         f.num("src_zero_pages"), f.num("src_bytes_sent") / 1e9, f.num("dst_listen_ms"),
                         f.num("verify_errors", -1) + f.num("touch_errors")));

}

}  // namespace bench
