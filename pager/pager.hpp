// pager/pager.hpp — the destination's side of post-copy.
//
// Fault path, in one place (pager/fault_loop.cpp):
//   vCPU touches a page that has not arrived → userfaultfd message → the fault thread
//   marks it REQUESTED (with a prefetch window of following MISSING pages) and sends one
//   PAGE_REQUEST on the urgent channel. The reply, or a pushed copy, is placed by
//   Pager::place() (pager/placer.cpp), which wakes the vCPU.
//
// Memory (pager/memory.cpp): regions with a file (memfd, hugetlbfs) are registered for
// MINOR faults; the file is allocated up front and arriving pages are written through a
// second, populated mapping and mapped into the guest with UFFDIO_CONTINUE. Anonymous
// regions are registered for MISSING faults and filled with UFFDIO_COPY/ZEROPAGE.
//
// Threads: the Pager owns one, the fault thread (start() .. stop()). place() is called
// by the receiving threads (pager/receiver.cpp), concurrently; the page-state table
// decides which copy of a page wins.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "src/net/frames.hpp"
#include "src/net/outbox.hpp"
#include "src/net/socket.hpp"
#include "src/page_state.hpp"
#include "src/protocol.hpp"
#include "src/stats.hpp"
#include "uffd/uffd.hpp"

namespace lazymig::pager {

struct PagerStats {
    Counter faults, requests, zero, duplicate;
    Counter pushed_pages, demanded_pages;
    Histogram fault_latency;
};

// One guest region as the destination sees it.
struct Region {
    GuestRegion guest;
    std::size_t pages = 0;
    std::byte* alias = nullptr;  // writable second mapping of the file; null for anon
    PageStateTable state;
    // Microseconds since the pager's epoch at which a fault on the page was first seen
    // (0 = none); read back when the page is placed, for the fault-latency histogram.
    std::unique_ptr<std::atomic<std::uint32_t>[]> fault_at;
    // Prefetch trend, touched only by the fault thread.
    std::uint64_t last_fault = ~0ull;
    std::uint32_t window = 1;

    [[nodiscard]] std::byte* host(std::uint64_t page) const {
        return static_cast<std::byte*>(guest.host) + page * guest.page_size;
    }
};

// Sends a PAGE_REQUEST on the urgent channel; called on the fault thread only.
using RequestSink = std::function<Result<void>(const proto::PageRequest&)>;

class Pager {
public:
    // Opens the uffd with the features the regions need (an error names a missing one),
    // allocates and maps the files' aliases, empties the guest mappings and registers them.
    [[nodiscard]] static Result<std::unique_ptr<Pager>> create(std::span<const GuestRegion> regions,
                                                               std::uint32_t prefetch_pages);
    ~Pager();
    Pager(const Pager&) = delete;
    Pager& operator=(const Pager&) = delete;

    // Starts the fault thread. `on_error` is called once if it fails.
    [[nodiscard]] Result<void> start(RequestSink sink, std::function<void(const Error&)> on_error);
    // Starts the fault thread sending its requests through `out`.
    [[nodiscard]] Result<void> start(net::Outbox& out, std::function<void(const Error&)> on_error) {
        return start([&out](const proto::PageRequest& req) { return out.post_and_flush(proto::encode(req), std::chrono::seconds(10)); },
                     std::move(on_error));
    }
    // Names the VMM's vCPU threads for blocktime.
    void set_vcpu_threads(std::vector<VcpuThread> threads) {
        std::lock_guard lock(vcpu_mu_);
        vcpus_ = std::move(threads);
    }
    // Stops and joins the fault thread (idempotent).
    void stop();

    // Places pages [first, first+count) of `region`. `data` holds the non-zero pages
    // back to back, in order; zero pages are flagged in `meta`. Pages already placed
    // are counted as duplicates. Returns how many pages this call made present.
    [[nodiscard]] Result<std::uint64_t> place(const proto::PagesMeta& meta, const std::byte* data,
                                              bool demanded);

    // The most pages one fault may request (1..kMaxPagesPerFrame); takes effect at the next fault.
    void set_prefetch(std::uint32_t pages) {
        prefetch_max_.store(std::clamp<std::uint32_t>(pages, 1, proto::kMaxPagesPerFrame), std::memory_order_relaxed);
    }
    [[nodiscard]] std::uint64_t total_pages() const { return total_pages_; }
    [[nodiscard]] std::uint64_t present_pages() const { return present_.load(std::memory_order_acquire); }
    [[nodiscard]] bool complete() const { return present_pages() == total_pages_; }
    // Called once, by the thread whose placement made the last page present.
    void on_complete(std::function<void()> fn) { on_complete_ = std::move(fn); }

    // Every page present: unregisters the regions; the guest memory is plain memory again.
    [[nodiscard]] Result<void> finish();
    // The source is gone: poisons every page that never arrived so a touch raises SIGBUS
    // instead of reading zeroes, and wakes threads blocked on them. Returns how many.
    [[nodiscard]] Result<std::uint64_t> poison_missing();

    [[nodiscard]] const std::vector<Region>& regions() const { return regions_; }
    [[nodiscard]] std::span<const GuestRegion> guest_regions() const { return guest_; }
    [[nodiscard]] PagerStats& stats() { return stats_; }
    [[nodiscard]] const uffd::Uffd& uffd() const { return uffd_; }
    // Bytes of the pager's own bookkeeping (state table + fault stamps).
    [[nodiscard]] std::size_t overhead_bytes() const;
    [[nodiscard]] std::uint32_t now_us() const;

private:
    Pager() = default;
    void fault_thread();
    Result<void> handle_fault(const uffd::Event& ev);
    Result<void> place_run(Region& r, std::uint64_t first, std::uint64_t count, bool zero,
                           const std::byte* data);
    void mark_present(Region& r, std::uint64_t first, std::uint64_t count, std::uint32_t placed_at_us);

    std::vector<Region> regions_;
    std::vector<GuestRegion> guest_;
    std::mutex vcpu_mu_;
    std::vector<VcpuThread> vcpus_;
    std::uint64_t total_pages_ = 0;
    std::atomic<std::uint64_t> present_{0};
    std::atomic<std::uint32_t> prefetch_max_{16};
    uffd::Uffd uffd_;
    std::vector<std::byte> zero_page_;  // source for zero huge pages (no ZEROPAGE on hugetlb)
    std::function<void()> on_complete_;
    RequestSink sink_;
    std::function<void(const Error&)> on_error_;
    net::ShutdownEvent stop_event_;
    std::thread thread_;
    PagerStats stats_;
    std::chrono::steady_clock::time_point epoch_ = std::chrono::steady_clock::now();
};

// Receives frames on one channel until it closes or fails. PAGES frames are verified
// (checksum, bounds) and placed; every other frame goes to `on_control`, which returns
// false to stop. A frame that fails verification ends the loop with an error and none
// of its pages is placed.
using ControlHandler = std::function<Result<bool>(const proto::Header&, std::vector<std::byte>)>;
[[nodiscard]] Result<void> receive_loop(net::FrameReader& reader, Pager& pager, bool demanded,
                                        const ControlHandler& on_control);

}  // namespace lazymig::pager
