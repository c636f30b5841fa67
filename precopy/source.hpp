// precopy/source.hpp — the source's side: serving demand requests and pushing pages.
//
//   PageFramer    builds PAGES frames whose page data is sent straight from guest RAM
//                 (gathered iovecs: no copy on the source), zero pages as bits.
//   serve_loop    the urgent channel after switchover: PAGE_REQUEST → PAGES, at once;
//                 each request is also a hint for the pusher.
//   Pusher        its own thread: sends every page not yet sent on the bulk channel,
//                 the neighbourhood of recent faults first, then in address order.
// The guest is paused during post-copy, so reading its RAM needs no synchronisation.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "src/net/frames.hpp"
#include "src/net/ring.hpp"
#include "src/net/socket.hpp"
#include "src/protocol.hpp"
#include "src/stats.hpp"

namespace lazymig::source {

struct SourceStats {
    Counter pushed_pages, demanded_pages, zero_pages, requests, bytes_sent, sent_pages;
};

// Which pages have been sent at least once (a byte per page, set by either thread).
class SentMap {
public:
    explicit SentMap(std::span<const GuestRegion> regions);
    // Marks the page sent; true if it had not been.
    bool mark(std::uint32_t region, std::uint64_t page) {
        return sent_[region][page].exchange(1, std::memory_order_relaxed) == 0;
    }
    [[nodiscard]] bool sent(std::uint32_t region, std::uint64_t page) const {
        return sent_[region][page].load(std::memory_order_relaxed) != 0;
    }
    [[nodiscard]] std::size_t bytes() const;

private:
    std::vector<std::unique_ptr<std::atomic<std::uint8_t>[]>> sent_;
    std::vector<std::size_t> pages_;
};

// Builds one PAGES frame at a time. Not thread-safe: one per sending thread.
class PageFramer {
public:
    explicit PageFramer(std::span<const GuestRegion> regions) : regions_(regions) {}
    // Prepares pages [first, first+count) of `region`; returns the iovecs to send,
    // valid until the next call. REQUIRES: the range lies inside the region and
    // count <= kMaxPagesPerFrame.
    std::span<const iovec> build(std::uint32_t region, std::uint64_t first, std::uint32_t count,
                                 std::uint64_t* zero_pages, std::size_t* bytes);

private:
    std::span<const GuestRegion> regions_;
    std::array<std::byte, proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8> head_{};
    std::array<iovec, proto::kMaxPagesPerFrame + 1> iov_{};
    std::array<std::uint32_t, proto::kMaxPagesPerFrame> crcs_{};
    std::array<const std::byte*, proto::kMaxPagesPerFrame> ptrs_{};
};

// Pages near a recent fault, handed from the urgent thread to the pusher. Bounded: when
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

struct PushConfig {
    std::atomic<std::uint64_t>* max_bandwidth;  // bytes/s, 0 = unlimited; read per batch
    std::atomic<std::uint32_t>* batch_pages;
};

// The background pusher. Owns its thread; sends PUSH_DONE when every page was sent.
class Pusher {
public:
    Pusher(std::span<const GuestRegion> regions, SentMap& sent, HintQueue& hints, SourceStats& stats,
           PushConfig config)
        : regions_(regions), sent_(sent), hints_(hints), stats_(stats), config_(config), framer_(regions) {}
    ~Pusher() { join(); }
    // Starts sending on the bulk channels; `on_error` is called once if pushing fails.
    [[nodiscard]] Result<void> start(std::vector<net::Channel*> bulk, std::function<void(const Error&)> on_error);
    void join();

private:
    Result<void> run();
    Result<void> push_range(std::uint32_t region, std::uint64_t from, std::uint64_t to);
    Result<void> send_batch(std::uint32_t region, std::uint64_t first, std::uint32_t count);

    std::span<const GuestRegion> regions_;
    SentMap& sent_;
    HintQueue& hints_;
    SourceStats& stats_;
    PushConfig config_;
    PageFramer framer_;
    std::vector<net::Channel*> bulk_;
    std::thread thread_;
    std::chrono::steady_clock::time_point next_send_{};
};

// Serves the urgent channel from the moment the device state is sent until the
// destination reports COMPLETE (returns normally) or something fails. Every
// PAGE_REQUEST is answered at once: the destination may fault before its RESUMED
// arrives here (a VMM thread can touch guest RAM before the vCPUs run), so RESUMED is
// just one more frame, reported through `on_resumed` (which starts the pusher), and
// must precede COMPLETE.
[[nodiscard]] Result<void> serve_loop(net::FrameReader& reader, net::Channel& urgent,
                                      std::span<const GuestRegion> regions, SentMap& sent, HintQueue& hints,
                                      SourceStats& stats, const std::function<Result<void>()>& on_resumed);

}  // namespace lazymig::source
