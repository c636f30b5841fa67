#include "matrix.hpp"

#include <tuple>
#include <utility>

namespace chaos {

std::vector<Row> matrix() {
    using O = Outcome;
    std::vector<Row> rows;
    const std::vector<std::string> workloads{"pattern", "bank", "kv"};
    auto add = [&](Row r) {
        for (const auto& w : workloads) {
            r.workload = w;
            rows.push_back(r);
        }
    };
    const Expect resumed{{O::resumed_on_source}, ""};
    const Expect recovered{{O::recovered}, ""};
    const Expect stopped_missing{{O::stopped_with_error}, "pages never arrived"};
    // The source died before GO: the destination never ran the VM and says so.
    const Expect src_lost_early{{O::stopped_with_error}, "the source closed the connection"};
    // The destination died after GO: the source cannot know it never ran the VM.
    const Expect dst_lost_after_go{{O::stopped_with_error}, "GO was sent, so the destination may be running the VM: it was not resumed here"};

    for (const std::string mode : {"postcopy", "hybrid", "precopy"}) {
        const bool pre = mode != "postcopy";
        // Pre-copy: the destination dies while it receives round 1 → the VM never left.
        if (pre) {
            add({.scenario = "dst-killed-during-precopy", .mode = mode,
                 .fault = {.killed = Side::destination, .failpoint = "pager_bulk_before_place=kill:8"},
                 .today = resumed, .merged = resumed, .in_short = mode == "hybrid" ? "bank" : ""});
            // The source host dies while it pre-copies: it held the only running copy.
            // (mid round 1, and at the start of round 2 of a pre-copy the link slows).
            add({.scenario = "src-killed-during-precopy", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_precopy_batch=kill:8"},
                 .today = src_lost_early, .merged = src_lost_early, .in_short = mode == "precopy" ? "pattern" : ""});
            add({.scenario = "src-killed-at-precopy-round-2", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_precopy_round=kill:2", .throttle = 30'000'000,
                           .params = {{"compression", "off"}, {"downtime-limit", 1}}},
                 .today = src_lost_early, .merged = src_lost_early});
        }
        // Switchover: the destination dies with the device state in hand, before GO.
        add({.scenario = "dst-killed-before-go", .mode = mode,
             .fault = {.killed = Side::destination, .failpoint = "destination_before_device_loaded=kill"},
             .today = resumed, .merged = resumed, .in_short = mode == "postcopy" ? "kv" : ""});
        // The source dies just before GO: the destination never got the VM.
        add({.scenario = "src-killed-before-go", .mode = mode,
             .fault = {.killed = Side::source, .failpoint = "source_before_go=kill"},
             .today = src_lost_early, .merged = src_lost_early});
        if (mode == "precopy") continue;  // the rest is post-copy
        // Mid post-copy, the source dies: the pages it still held are gone.
        add({.scenario = "src-killed-mid-postcopy", .mode = mode,
             .fault = {.killed = Side::source, .failpoint = "source_push_batch=kill:4"},
             .today = stopped_missing, .merged = stopped_missing, .in_short = mode == "postcopy" ? "pattern" : ""});
        // ... or while it serves a demand fault (post-copy: every touch is a request).
        if (mode == "postcopy")
            add({.scenario = "src-killed-serving-a-fault", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_serve_request=kill:3"},
                 .today = stopped_missing, .merged = stopped_missing});
        // ... and with --poison-on-loss the VM goes on; only the missing pages fault.
        add({.scenario = "src-killed-mid-postcopy-poison", .mode = mode,
             .fault = {.killed = Side::source, .failpoint = "source_push_batch=kill:4", .dst_args = {"--poison-on-loss"}},
             // Hybrid: the destination cannot tell a dead source from a cut link (after which
             // the source resumes the VM), so it stops whatever poison_on_loss says.
             .today = {}, .merged = mode == "hybrid" ? stopped_missing : Expect{{O::poisoned}, "", true}, .needs = "recover",
             .in_short = mode == "postcopy" ? "pattern" : ""});
        // The destination dies after GO: post-copy cannot bring the VM back (it ran
        // there); hybrid resumes it on the source from the last committed epoch.
        // (After GO the source must say that the destination may run the VM; mid
        // post-copy, that the destination went away.)
        // The killed destination's socket closes with a FIN, or with a RST when bytes
        // were still unread: the source then takes it for a lost link, pauses, and gives
        // up after the recover timeout.
        const Expect dst_lost_mid{{O::stopped_with_error},
                                  "the destination closed the connection|the destination may be running the VM: it was not resumed here"};
        for (const auto& [scenario, fp, lost] : std::vector<std::tuple<std::string, std::string, Expect>>{
                 {"dst-killed-after-go", "destination_after_go=kill", dst_lost_after_go},
                 {"dst-killed-mid-postcopy", "pager_urgent_before_place=kill:2", dst_lost_mid}}) {
            if (mode == "postcopy")
                add({.scenario = scenario, .mode = mode, .fault = {.killed = Side::destination, .failpoint = fp},
                     .today = lost, .merged = lost, .in_short = scenario == "dst-killed-after-go" ? "kv" : ""});
            else if (scenario == "dst-killed-after-go")  // hybrid mid post-copy: the epoch points below
                add({.scenario = scenario, .mode = mode, .fault = {.killed = Side::destination, .failpoint = fp},
                     .today = lost, .merged = resumed, .needs = "replicate", .in_short = "kv"});
        }
        if (mode == "hybrid") {
            // The epoch points: hybrid post-copy carries only the stale set and ends in a
            // few hundred ms, often before an epoch. From GO on the proxy lets 1 MB/s of
            // pages through (and back-replication free), so post-copy outlasts the first
            // epochs whatever the workload; the runner fails a row whose point was not hit.
            const std::uint64_t crawl = 1'000'000;
            add({.scenario = "dst-killed-mid-epoch-send", .mode = mode,
                 .fault = {.killed = Side::destination, .failpoint = "destination_epoch_send=kill:3",
                           .postcopy_throttle_up = crawl},
                 .today = {}, .merged = resumed, .needs = "replicate"});
            add({.scenario = "dst-killed-after-commit-before-release", .mode = mode,
                 .fault = {.killed = Side::destination, .failpoint = "destination_epoch_committed=kill",
                           .postcopy_throttle_up = crawl},
                 .today = {}, .merged = resumed, .needs = "replicate"});
            // The source dies applying epoch 2: it cannot be resumed anywhere but on the
            // destination, which then misses the pages the source still held.
            add({.scenario = "src-killed-epoch-apply", .mode = mode,
                 .fault = {.killed = Side::source, .failpoint = "source_epoch_apply=kill:2",
                           .postcopy_throttle_up = crawl},
                 .today = {}, .merged = {{O::completed, O::stopped_with_error}, ""}, .needs = "replicate"});
        }
    }
    // Link loss. Post-copy: both sides pause, then migrate-recover, then completed.
    // Hybrid (back-replication on): the destination's lease lapses and fences it, and
    // the source resumes the VM from the last committed epoch. Pre-copy: the VM never
    // left the source and runs on there.
    for (const std::string mode : {"postcopy", "hybrid", "precopy"}) {
        const std::string when = mode == "precopy" ? "active" : "postcopy-active";
        const std::uint64_t slow = 20'000'000;  // 64 MiB take seconds: the fault lands mid-transfer
        const bool recovers = mode == "postcopy";
        const Expect link_lost = recovers ? recovered : resumed;
        const std::string needs = recovers ? "recover" : mode == "hybrid" ? "replicate" : "";
        add({.scenario = "cut", .mode = mode, .fault = {.wait_status = when, .proxy = {"cut"}, .recover = recovers, .throttle = slow},
             .today = needs.empty() ? link_lost : Expect{}, .merged = link_lost, .needs = needs,
             .in_short = mode == "postcopy" || mode == "hybrid" ? "kv" : ""});
        if (recovers)
            add({.scenario = "cut-recover-new-address", .mode = mode,
                 .fault = {.wait_status = when, .proxy = {"cut"}, .recover = true, .new_address = true, .throttle = slow},
                 .today = {}, .merged = recovered, .needs = "recover"});
        add({.scenario = "stall-past-heartbeat", .mode = mode,
             .fault = {.wait_status = when, .proxy = {"stall 20000"}, .recover = recovers, .throttle = slow},
             .today = mode == "precopy" ? Expect{{O::completed, O::resumed_on_source}, ""} : Expect{},
             .merged = mode == "precopy" ? Expect{{O::completed, O::resumed_on_source}, ""} : link_lost,
             .needs = needs});
        add({.scenario = "close-one-bulk-channel", .mode = mode,
             .fault = {.wait_status = when, .proxy = {"close 2"}, .recover = recovers, .throttle = slow},
             .today = needs.empty() ? link_lost : Expect{}, .merged = link_lost, .needs = needs});
        // A flipped byte: TLS refuses the record (no bad frame is placed); the channel is
        // lost like a cut one.
        add({.scenario = "corrupt", .mode = mode,
             .fault = {.wait_status = when, .proxy = {"corrupt"}, .recover = recovers, .throttle = slow},
             .today = needs.empty() ? link_lost : Expect{}, .merged = link_lost, .needs = needs, .in_short = mode == "postcopy" ? "bank" : ""});
        // During pre-copy the VM never left: it keeps running on the source.
        if (mode != "postcopy")
            add({.scenario = "corrupt-during-precopy", .mode = mode,
                 .fault = {.wait_status = "active", .proxy = {"corrupt"}, .throttle = 4'000'000,
                           .params = {{"compression", "off"}}},
                 .today = resumed, .merged = resumed});
    }
    return rows;
}

}  // namespace chaos
