// precopy/source.hpp — the source's side of the data path: serving demand requests and
// pushing pages.
//
//   PageFramer    reads a run of guest pages through a PageReader into its own staging
//                 buffer (populated once, reused), then zero-detects, checksums and
//                 frames that snapshot: what is sent is what was checksummed, even if
//                 the guest writes meanwhile. Zero pages travel as bitmap bits.
//   serve_loop    the urgent channel after switchover: PAGE_REQUEST → PAGES, at once;
//                 each request raises the DemandGate while in service and is a hint
//                 for the pusher.
//   Pusher        one sender thread per bulk channel, each sweeping its own contiguous
//                 share of every region (QEMU multifd style), the neighbourhood of
//                 recent faults first; each pipelines two staging buffers.
//   DemandGate    how the pushers yield to demand traffic.
//
// Memory beyond guest RAM: the sent map (a byte per page), 2 staging buffers per bulk
// channel plus 1 for the serve thread, PageFramer::kDefaultStaging (4 MiB) each.
#pragma once

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "precopy/page_reader.hpp"
#include "src/net/channel.hpp"
#include "src/net/frames.hpp"
#include "src/protocol.hpp"
#include "src/stats.hpp"

namespace lazymig::source {

struct SourceStats {
    Counter pushed_pages, demanded_pages, zero_pages, requests, bytes_sent, sent_pages, push_yields;
};

// The pages a bulk channel owns: share i of n of a region with `pages` pages is
// [share_start(pages, i, n), share_start(pages, i + 1, n)). The pusher and the pre-copy
// rounds split alike, so every copy of a page travels on the same channel, in order.
[[nodiscard]] inline std::uint64_t share_start(std::uint64_t pages, std::size_t i, std::size_t n) {
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(pages) * i) / n);
}

// Which pages have been sent at least once (a byte per page, set by any thread).
class SentMap {
public:
    explicit SentMap(std::span<const GuestRegion> regions);
    // Marks the page sent; true if it had not been.
    bool mark(std::uint32_t region, std::uint64_t page) {
        return sent_[region][page].exchange(1, std::memory_order_relaxed) == 0;
    }
    // The page must be sent again (dirtied after it was sent: hybrid's stale pages).
    void unmark(std::uint32_t region, std::uint64_t page) { sent_[region][page].store(0, std::memory_order_relaxed); }
    [[nodiscard]] bool sent(std::uint32_t region, std::uint64_t page) const {
        return sent_[region][page].load(std::memory_order_relaxed) != 0;
    }
    [[nodiscard]] std::size_t bytes() const;

private:
    std::vector<std::unique_ptr<std::atomic<std::uint8_t>[]>> sent_;
    std::vector<std::size_t> pages_;
};

// A populated, reused staging buffer (anonymous, MAP_POPULATE: a fresh buffer would
// cost a page fault per 4 KiB on its first fill — 10-18 µs each on this machine).
class StagingBuffer {
public:
    [[nodiscard]] static Result<StagingBuffer> create(std::size_t bytes);
    StagingBuffer() = default;
    StagingBuffer(StagingBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    StagingBuffer& operator=(StagingBuffer&& o) noexcept;
    StagingBuffer(const StagingBuffer&) = delete;
    StagingBuffer& operator=(const StagingBuffer&) = delete;
    ~StagingBuffer();
    [[nodiscard]] std::byte* data() const { return data_; }
    [[nodiscard]] std::size_t size() const { return size_; }

private:
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
};

// One built PAGES frame: header+meta, then the non-zero pages from the staging buffer.
// Valid, and its bytes untouched, until the framer's next build().
struct BuiltFrame {
    std::span<const iovec> iov;
    std::uint64_t zero_pages = 0;
    std::size_t bytes = 0;  // on the wire
};

// Builds one PAGES frame at a time from a snapshot. Not thread-safe: each sending
// thread owns its framers (a pipelining sender owns two).
class PageFramer {
public:
    // 4 MiB: a whole kMaxPagesPerFrame frame of 4 KiB pages, two 2 MiB huge pages.
    static constexpr std::size_t kDefaultStaging = std::size_t(proto::kMaxPagesPerFrame) * 4096;

    [[nodiscard]] static Result<std::unique_ptr<PageFramer>> create(std::span<const GuestRegion> regions,
                                                                    PageReader& reader,
                                                                    std::size_t staging_bytes = kDefaultStaging);
    // The most pages of `region` one frame can carry (staging size, kMaxPagesPerFrame).
    [[nodiscard]] std::uint32_t max_pages(std::uint32_t region) const;
    // Reads pages [first, first+count) of `region` into the staging buffer, then frames
    // them. REQUIRES: 1 <= count <= max_pages(region); the reader checks the range.
    // `type` is PAGES or PRECOPY_PAGES (the same payload).
    [[nodiscard]] Result<BuiltFrame> build(std::uint32_t region, std::uint64_t first, std::uint32_t count,
                                           proto::Type type = proto::Type::pages);
    // The snapshot the last build() read (for tests).
    [[nodiscard]] const std::byte* staging() const { return staging_.data(); }
    // The CRC32C of each non-zero page of the last build(), in order.
    [[nodiscard]] std::span<const std::uint32_t> page_crcs() const { return {crcs_.data(), nonzero_}; }

private:
    PageFramer(std::span<const GuestRegion> regions, PageReader& reader, StagingBuffer staging)
        : regions_(regions), reader_(reader), staging_(std::move(staging)) {}

    std::span<const GuestRegion> regions_;
    PageReader& reader_;
    StagingBuffer staging_;
    std::array<std::byte, proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8> head_{};
    std::array<iovec, proto::kMaxPagesPerFrame + 1> iov_{};
    std::array<std::uint32_t, proto::kMaxPagesPerFrame> crcs_{};
    std::array<const std::byte*, proto::kMaxPagesPerFrame> ptrs_{};
    std::size_t nonzero_ = 0;
};

// Pages near a recent fault, handed from the urgent thread to a sender. Bounded: when
// full the oldest hint is dropped (a hint is advice, never a duty).
class HintQueue {
public:
    void push(std::uint32_t region, std::uint64_t page);
    bool pop(std::uint32_t* region, std::uint64_t* page);

private:
    std::mutex mu_;
    std::array<std::pair<std::uint32_t, std::uint64_t>, 64> ring_{};
    std::size_t head_ = 0, size_ = 0;
};

// Demand requests in service, so that the pushers yield to them. The serve thread
// enter()s when a PAGE_REQUEST header arrives and leave()s once its reply was handed to
// the urgent channel; a sender calls wait_clear() before reading and framing each batch.
//
// Bound on a wait: a sender that finds requests in service waits until the count next
// drops to zero — the end of the requests in service when it arrived: each one's read
// (µs: a few pages through pread/process_vm_readv) plus its send on the urgent channel,
// which itself ends by the transport's deadline or shutdown. A request that arrives after
// that moment does not extend the wait: every drop to zero starts a new "clear epoch", and
// a waiter goes on once the epoch it saw has ended, even if the count is up again by the
// time it runs (else a guest faulting back to back starves the push: measured, with a
// client re-requesting at once the pusher never ran again). So bulk is slowed — one batch
// per request at most — never stopped. shutdown() ends every wait for good.
class DemandGate {
public:
    void enter() noexcept { state_.fetch_add(1, std::memory_order_acq_rel); }
    void leave() noexcept;
    // Blocks (futex) while the requests in service now are in service. false once shut down.
    [[nodiscard]] bool wait_clear() noexcept;
    void shutdown() noexcept {
        state_.fetch_or(kShut, std::memory_order_acq_rel);
        state_.notify_all();
    }
    [[nodiscard]] std::uint32_t in_service() const noexcept {
        return state_.load(std::memory_order_acquire) & kCount;
    }
    [[nodiscard]] bool shut_down() const noexcept { return state_.load(std::memory_order_acquire) & kShut; }

private:
    // One word, so one futex: bit 31 shut down, bits 16..30 the clear epoch, 0..15 the count.
    static constexpr std::uint32_t kShut = 1u << 31, kCount = 0xffff, kEpochOne = 1u << 16,
                                   kEpoch = kShut - kEpochOne;
    std::atomic<std::uint32_t> state_{0};
};

struct PushConfig {
    std::atomic<std::uint64_t>* max_bandwidth;  // bytes/s over all channels, 0 = unlimited; read per batch
    std::atomic<std::uint32_t>* batch_pages;    // pages per frame; read per batch
    DemandGate* gate = nullptr;                 // the senders yield while it is raised; null: never
    int nice = 0;                               // added to each sender thread's nice value (0: unchanged)
};

// The background pusher: one sender thread per bulk channel. Sender i owns pages
// [P*i/N, P*(i+1)/N) of every region (P pages, N channels) and sweeps them in address
// order, taking the fault hints routed to its share first; when its share is sent it
// sends PUSH_DONE on its channel. The sent map keeps a page from going out twice
// whoever sends it (another sender's hint window, the serve thread).
//
// Pipelining: each sender owns two framers; it reads and frames batch k+1 while batch k
// is on the wire (Channel::send_start), then send_finish()es k and starts k+1.
//
// Threads: start(), stop(), join() from the session thread; hint() from the serve
// thread, also before start() (hints are kept for the first sender until then).
class Pusher {
public:
    static constexpr std::size_t kMaxChannels = 16;

    Pusher(std::span<const GuestRegion> regions, PageReader& reader, SentMap& sent, SourceStats& stats,
           PushConfig config);
    ~Pusher();  // stop(), join()
    Pusher(const Pusher&) = delete;
    Pusher& operator=(const Pusher&) = delete;

    // Starts one sender per channel (1 to kMaxChannels). `on_error` is called at most
    // once, from a sender thread, with the first failure other than ECANCELED; the other
    // senders then stop. A thread that cannot be started is an error: the senders
    // already started are stopped and joined first.
    [[nodiscard]] Result<void> start(std::vector<net::Channel*> bulk, std::function<void(const Error&)> on_error);
    // Allocates the senders' staging buffers (2 × 4 MiB each, populated) for `channels`
    // senders, so that start() spawns threads only. The session calls it before the
    // switchover: populating them while the VM is paused lengthens the downtime.
    // start() prepares itself when this was not called.
    [[nodiscard]] Result<void> prepare(std::size_t channels);
    // Asks every sender to stop before its next batch and ends a wait on the gate (the
    // gate is shut for good). A sender blocked inside a channel call ends when the
    // transport's shutdown eventfd fires: signal that too.
    void stop();
    // Waits for every sender. REQUIRES: they finish, or stop() and the transport's
    // shutdown were signalled.
    void join();
    // A fault at `page`: its neighbourhood goes first, on the sender that owns it.
    void hint(std::uint32_t region, std::uint64_t page);

private:
    struct Lane;
    Result<void> run(Lane& lane);
    Result<void> push_range(Lane& lane, std::uint32_t region, std::uint64_t from, std::uint64_t to);
    Result<void> submit(Lane& lane, std::uint32_t region, std::uint64_t first, std::uint32_t count);
    Result<void> finish(Lane& lane);
    [[nodiscard]] std::size_t owner(std::uint32_t region, std::uint64_t page, std::size_t lanes) const;
    void report(const Error& e);

    std::span<const GuestRegion> regions_;
    PageReader& reader_;
    SentMap& sent_;
    SourceStats& stats_;
    PushConfig config_;
    std::array<HintQueue, kMaxChannels> hints_;
    std::atomic<std::size_t> live_lanes_{0};  // hint routing; 0 before start: lane 0 keeps them
    std::vector<std::unique_ptr<Lane>> lanes_;
    std::function<void(const Error&)> on_error_;
    std::atomic<bool> stop_{false}, reported_{false};
};

// Serves the urgent channel from the moment the device state is sent until the
// destination reports COMPLETE (returns normally) or something fails. Every
// PAGE_REQUEST is answered at once, read through `reader` into the loop's own staging
// buffer and sent with urgent.send() (a request larger than one staging buffer goes out
// as several PAGES frames). While a request is in service `gate` is raised. RESUMED is
// one more frame, reported through `on_resumed` (which starts the pusher), and must
// precede COMPLETE. `pusher` receives the hints; null: none are given. `framer` (with
// its staging buffer) is made before the switchover: populating 4 MiB while the VM is
// paused lengthened the downtime by up to 13 ms here.
[[nodiscard]] Result<void> serve_loop(net::FrameReader& frames, net::Channel& urgent,
                                      std::span<const GuestRegion> regions, PageFramer& framer, SentMap& sent,
                                      Pusher* pusher, SourceStats& stats, DemandGate& gate,
                                      const std::function<Result<void>()>& on_resumed,
                                      const std::function<Result<void>()>& on_device_loaded = {},
                                      const std::function<void()>& on_echo = {}, bool resumed = false,
                                      const std::function<Result<void>()>& on_complete = {});
// resumed: the destination runs the VM already (a link after recover): no RESUMED comes.
// on_complete: called when COMPLETE is read; its error is the loop's.
// With on_device_loaded: DEVICE_LOADED must come (once) before RESUMED and calls it (the
// session sends GO there); requests are served meanwhile. HEARTBEATs are echoed, and
// on_echo is called after each echo was sent (hybrid: the echo renews the destination's
// lease; the source remembers when it last sent one).

}  // namespace lazymig::source
