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
#include <optional>
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

// Adaptive lz4 for pre-copy frames (Parameters::compression). pack() turns a built
// PRECOPY_PAGES frame into a PRECOPY_LZ4 frame of the same pages (one LZ4 block per
// non-zero page; a page that does not shrink goes as it is). wanted() says whether the
// next frame should be packed: always (on), never (off), or (automatic) while the
// running ratio is >= 1.5 and packing is fast enough that it saves more link time than
// it costs CPU time — a sender that compresses at C bytes/s onto a link of L bytes/s
// gains only if C > L × r / (r − 1) for ratio r; one frame in kProbeEvery is packed
// regardless, to keep both samples fresh. Its buffer is allocated once, up front.
class Packer {
public:
    static constexpr std::uint32_t kProbeEvery = 32;
    [[nodiscard]] static Result<Packer> create(std::size_t largest_page);
    [[nodiscard]] bool wanted(Compression mode, double link_bytes_per_s);
    // REQUIRES: `frame` was built by `framer` just now, as PRECOPY_PAGES of pages of `ps` bytes.
    [[nodiscard]] BuiltFrame pack(const BuiltFrame& frame, const PageFramer& framer, std::size_t ps);
    [[nodiscard]] double ratio() const { return ratio_; }

private:
    StagingBuffer buf_;
    iovec iov_{};
    double ratio_ = 0, pack_rate_ = 0;  // running: raw/stored, raw bytes per second of packing
    std::uint32_t since_probe_ = 0;
};

class Precopy {
public:
    Precopy(std::span<const GuestRegion> regions, PageReader& reader, SentMap& sent, SourceStats& stats,
            PrecopyConfig config);

    // Creates the framer and arms `tracker` (which this object then owns).
    [[nodiscard]] Result<void> start(std::unique_ptr<DirtyTracker> tracker, std::vector<net::Channel*> bulk);
    // Runs rounds until decide() says anything but next_round, or `stop` is set
    // (ECANCELED). The VM runs at the source throughout. Each round ends with ROUND_END
    // on every bulk channel and waits for its ROUND_ACK on `urgent` (which ends with the
    // channel: an answer, the link's loss, or the transport's shutdown on cancel()).
    [[nodiscard]] Result<Verdict> run_rounds(const std::atomic<bool>& stop, net::FrameReader& urgent);
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
    Result<void> end_round(std::uint32_t n, net::FrameReader& urgent);

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
    std::optional<Packer> packer_;
    double link_rate_ = 0;  // wire bytes per second of send(), running
    std::uint64_t round_packed_wire_ = 0, round_ram_bytes_ = 0;
    std::atomic<std::uint64_t> packed_pages_{0}, packed_raw_{0}, packed_wire_{0};

public:
    [[nodiscard]] std::uint64_t compressed_pages() const { return packed_pages_.load(); }
    [[nodiscard]] double compression_ratio() const {
        const auto w = packed_wire_.load();
        return w ? double(packed_raw_.load()) / double(w) : 0;
    }
};

}  // namespace lazymig::source
