// precopy/precopy.hpp — pre-copy rounds and the switchover decision (modes precopy, hybrid).
//
//   Precopy pre(regions, reader, sent, stats, {.mode = Mode::hybrid, .params = &params});
//   pre.start(tracker, bulk_channels);               // the first pass starts from a clean log
//   auto d = pre.run_rounds(stop);                   // rounds until a decision
//   ... pause vCPUs ...
//   pre.switchover(urgent);                          // final scan, last pages or STALE, PRECOPY_END
//
// Round 1 sends every page (zero pages as bitmap bits); round k+1 the pages the tracker
// reported written during round k. After each round decide() looks at the history:
//   converged     the dirty set left would take <= downtime_limit_ms at the bandwidth the
//                 round measured → switch (precopy: stop-and-copy; hybrid: post-copy of
//                 what is stale, which is that small set)
//   bound         max_rounds / max_precopy_bytes / max_precopy_ms reached → hybrid
//                 switches to post-copy; precopy gives up (the VM keeps running here)
//   diverging     (hybrid only) the dirty rate >= the bandwidth over the last two rounds,
//                 or the dirty set not shrinking over the last three → post-copy now
//
// Ordering: a page always goes on the bulk channel whose share holds it
// (share_start()), so its copies reach the destination in the order they were read; the
// destination applies STALE only after PRECOPY_END on every bulk channel.
//
// Threads: everything from the session thread; rounds() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "precopy/dirty_tracker.hpp"
#include "precopy/source.hpp"

namespace lazymig::source {

enum class Decision : std::uint8_t { invalid = 0, next_round, converged, bound, diverging };

struct Verdict {
    Decision decision = Decision::invalid;
    std::string why;
};

// The switchover policy, alone so that it can be tested on a made-up history.
// `remaining_bytes` is the dirty set left after the last round; `elapsed_ms` and
// `bytes_sent` count all of pre-copy so far.
[[nodiscard]] Verdict decide(Mode mode, const Parameters& p, const std::vector<Stats::Round>& history,
                             std::uint64_t remaining_bytes, double elapsed_ms, std::uint64_t bytes_sent);

struct PrecopyConfig {
    Mode mode = Mode::invalid;                  // precopy or hybrid
    const std::atomic<std::uint64_t>* max_bandwidth = nullptr;  // bytes/s, 0 = unlimited
    std::function<Parameters()> parameters;     // the current ones, read every round
};

class Precopy {
public:
    Precopy(std::span<const GuestRegion> regions, PageReader& reader, SentMap& sent, SourceStats& stats,
            PrecopyConfig config);

    // Creates the framer and arms `tracker` (which this object then owns).
    [[nodiscard]] Result<void> start(std::unique_ptr<DirtyTracker> tracker, std::vector<net::Channel*> bulk);
    // Runs rounds until decide() says anything but next_round, or `stop` is set
    // (ECANCELED). The VM runs at the source throughout.
    [[nodiscard]] Result<Verdict> run_rounds(const std::atomic<bool>& stop);
    // With the vCPUs paused: the final dirty scan, then (precopy) those pages sent now,
    // or (hybrid) their runs as STALE on `urgent`, marked unsent for the post-copy;
    // PRECOPY_END on every bulk channel. Stops the tracker.
    [[nodiscard]] Result<void> switchover(net::Channel& urgent);
    // Stops tracking (idempotent): the guest's writes run free.
    void stop_tracking() noexcept;

    [[nodiscard]] std::vector<Stats::Round> rounds() const;
    [[nodiscard]] std::uint64_t pages_resent() const { return resent_.load(); }
    [[nodiscard]] std::uint64_t stale_pages() const { return stale_.load(); }
    [[nodiscard]] std::string method() const;

private:
    // Sends every page set in `pages` as PRECOPY_PAGES, each run on its share's channel.
    Result<void> send_set(const DirtySet& pages, Stats::Round& round);
    Result<void> send_run(std::uint32_t region, std::uint64_t first, std::uint64_t count, Stats::Round& round);

    std::span<const GuestRegion> regions_;
    PageReader& reader_;
    SentMap& sent_;
    SourceStats& stats_;
    PrecopyConfig config_;
    std::unique_ptr<DirtyTracker> tracker_;
    std::vector<net::Channel*> bulk_;
    std::unique_ptr<PageFramer> framer_;
    DirtySet dirty_;
    std::chrono::steady_clock::time_point began_{}, next_send_{};
    std::uint64_t bytes_total_ = 0;
    std::atomic<std::uint64_t> resent_{0}, stale_{0};
    mutable std::mutex mu_;
    std::vector<Stats::Round> rounds_;
    std::string method_;
};

}  // namespace lazymig::source
