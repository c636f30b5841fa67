// matrix.hpp — the chaos matrix: what each row does to a migration and what it expects.
// chaos_runner.cpp runs the rows; this file is where a row is added or switched on.
//
// A row is scenario × mode × workload. `today` is its expectation on this branch;
// `merged` the one once the features in `needs` are there (the two switches below).
// A row with needs and no today-expectation is skipped, with its reason printed, until
// its switch is on.
#pragma once

#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace chaos {

// ---- Switches for the merge: one line each. ----
// recover branch: migrate-pause, migrate-recover {"uri"}, phases paused/recovering,
// --poison-on-loss; link loss pauses both sides instead of failing them.
constexpr bool kHaveRecover = true;
// replicate branch: back-replication epochs, output commit, lease; the epoch kill
// points; the source resumes from the last committed epoch when the destination is lost.
constexpr bool kHaveReplicate = true;

enum class Outcome { completed, resumed_on_source, recovered, stopped_with_error, poisoned, other };
inline const char* name(Outcome o) {
    switch (o) {
    case Outcome::completed: return "completed";
    case Outcome::resumed_on_source: return "resumed on source";
    case Outcome::recovered: return "recovered after reconnect";
    case Outcome::stopped_with_error: return "VM stopped with error";
    case Outcome::poisoned: return "runs, missing pages poisoned";
    default: return "other";
    }
}

enum class Side { none, source, destination };

// What a row does to the migration.
struct Fault {
    Side killed = Side::none;
    std::string failpoint;            // "<point>=kill[:N]" in the killed side's environment
    std::string wait_status;          // proxy fault: after the source's MIGRATION status ...
    std::vector<std::string> proxy;   // ... these proxy commands
    bool recover = false;             // then migrate-recover on both sides (needs recover)
    bool new_address = false;         // ... to a new destination address and proxy port
    std::uint64_t throttle = 0;       // the link's rate during the migration (bytes/s); 0: free
    // Post-copy that lasts: the source holds just before GO (source_before_go=hold:FIFO)
    // until the proxy throttles the source → destination direction to this rate (bytes/s),
    // so every post-copy page crawls while back-replication (destination → source) runs
    // free. Pre-copy ran unthrottled. 0: not used.
    std::uint64_t postcopy_throttle_up = 0;
    std::vector<std::string> dst_args;  // more `run` options for the destination
    nlohmann::json params = nlohmann::json::object();     // migrate-set-parameters on the source before migrate
};

struct Expect {
    std::set<Outcome> outcomes;
    std::string error;                // substring of the surviving side's error, when stopped;
                                      // alternatives separated by '|'
    bool check_fails_with_poison = false;  // poison-on-loss: the checker names a poisoned page
};

struct Row {
    std::string scenario, mode, workload;
    Fault fault;
    Expect today, merged;             // merged: with the features of `needs` on
    std::string needs;                // "", "recover", "replicate", "recover+replicate"
    std::string in_short;             // the workload this row runs with in --matrix short; "": none

    // Every feature the row needs is on this branch.
    [[nodiscard]] bool merged_on() const {
        if (needs.find("recover") != std::string::npos && !kHaveRecover) return false;
        if (needs.find("replicate") != std::string::npos && !kHaveReplicate) return false;
        return true;
    }
    // Runs: with its merged expectation once the features are on; before that only if
    // it has an expectation for today (then without the steps that need them).
    [[nodiscard]] bool enabled() const { return merged_on() || !today.outcomes.empty(); }
    [[nodiscard]] const Expect& expect() const { return needs.empty() ? today : merged_on() ? merged : today; }
    [[nodiscard]] std::string id() const { return scenario + "/" + mode + "/" + workload; }
};

// Every row of --matrix full; a row's `in_short` workload is its one run in --matrix short.
[[nodiscard]] std::vector<Row> matrix();

}  // namespace chaos
