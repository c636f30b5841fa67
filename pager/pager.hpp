// pager/pager.hpp — the destination's side of post-copy.
//
// Fault path, in one place (pager/fault_loop.cpp):
//   vCPU touches a page that has not arrived → userfaultfd message → the fault thread
//   marks it REQUESTED (with a prefetch window of following MISSING pages) and sends one
//   PAGE_REQUEST on the urgent channel. The reply, or a pushed copy, is placed by
//   Pager::place() (pager/placer.cpp), which wakes the vCPU.
//
// Memory (pager/memory.cpp): regions with a file (memfd, hugetlbfs) are registered for
// MINOR faults; the file is made fresh up front (hole punched, then allocated: every page
// reads zero) and arriving pages are written into it with pwritev and mapped into the
// guest with UFFDIO_CONTINUE. Anonymous regions are registered for MISSING faults and
// filled with UFFDIO_COPY/ZEROPAGE. Placement itself is the Placer (pager/placer.hpp).
//
// Blocktime (pager/blocktime.hpp): each fault's wait is attributed to the faulting
// thread (UFFD_FEATURE_THREAD_ID, opened when the kernel has it).
//
// Threads: the Pager owns one, the fault thread (start() .. stop()). place() is called
// by the receiving threads (pager/receiver.cpp), concurrently; the page-state table
// decides which copy of a page wins. Stats and set_* may be called from any thread.
#pragma once

#include <array>
#include <condition_variable>
#include <chrono>
#include <optional>
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
#include "pager/blocktime.hpp"
#include "pager/placer.hpp"
#include "src/page_state.hpp"
#include "src/protocol.hpp"
#include "src/stats.hpp"
#include "uffd/uffd.hpp"

namespace lazymig::pager {

struct PagerStats {
    Counter faults, requests, zero, duplicate;
    Counter pushed_pages, demanded_pages;
    Counter precopy_pages;  // placed or staged from PRECOPY_PAGES
    Histogram fault_latency;
    Counter removed_pages;  // adopted uffd: pages the VMM discarded (UFFD_EVENT_REMOVE)
};

// Where the fault thread sends its requests when page bytes do not come as PAGES frames
// (RDMA: the destination READs them). Called on the fault thread; must not block.
// Pages [first, first+count) of region `ri` are REQUESTED.
class RequestSink {
public:
    virtual ~RequestSink() = default;
    [[nodiscard]] virtual Result<void> request(std::uint32_t ri, std::uint64_t first, std::uint32_t count) = 0;
};

class Pager final : private PlaceObserver {
public:
    // Opens the uffd with the features the regions need (an error names a missing one) and
    // THREAD_ID when the kernel has it, makes the files fresh (every page reads zero; a
    // hugetlbfs file also gets its populated alias), empties the guest mappings and
    // registers them.
    // Refuses user-mode-only userfaultfd unless `allow_user_mode_only` (see
    // DestinationConfig::allow_user_mode_only): the error says how to grant full uffd.
    [[nodiscard]] static Result<std::unique_ptr<Pager>> create(std::span<const GuestRegion> regions,
                                                               std::uint32_t prefetch_pages,
                                                               bool allow_user_mode_only = false);
    // userfaultfd catches user-mode faults only (kernel accesses get EFAULT).
    [[nodiscard]] bool user_mode_only() const { return uffd_.features().user_mode_only; }
    // Serves a userfaultfd another process (the VMM) created and registered for MISSING
    // faults over `regions` (addresses in that process; anonymous memory: fd -1). Nothing
    // is registered or emptied here: pages are placed with UFFDIO_COPY/ZEROPAGE into the
    // VMM's mm. If the uffd has EVENT_REMOVE, a range the VMM discards (MADV_DONTNEED, a
    // balloon) is served as zero pages from then on (RemoveGate).
    [[nodiscard]] static Result<std::unique_ptr<Pager>> adopt(uffd::Uffd uffd, std::span<const GuestRegion> regions,
                                                              std::uint32_t prefetch_pages);
    ~Pager();
    Pager(const Pager&) = delete;
    Pager& operator=(const Pager&) = delete;

    // Starts the fault thread, which sends its PAGE_REQUESTs through `out` (never blocking
    // on it) and drains `out` when it holds unsent bytes. `on_error` is called once if the
    // thread fails. REQUIRES: `out` outlives stop().
    [[nodiscard]] Result<void> start(net::Outbox& out, std::function<void(const Error&)> on_error);
    // Requests go to `sink` instead of the outbox. REQUIRES: before start(); `sink`
    // outlives stop().
    void set_request_sink(RequestSink* sink) { sink_ = sink; }
    // For a RequestSink: claims page p (MISSING/REQUESTED → PLACING) so that only the
    // caller may write it, then Pager::map_claimed (Placer::map_claimed) maps it.
    [[nodiscard]] bool claim(std::uint32_t ri, std::uint64_t p) { return regions_[ri].state.claim(p); }
    void unclaim(std::uint32_t ri, std::uint64_t p) { regions_[ri].state.unclaim(p); }
    [[nodiscard]] Result<std::uint64_t> map_claimed(std::uint32_t ri, std::uint64_t first, std::uint32_t count,
                                                    ZeroBits zero, const std::byte* data, bool demanded);
    [[nodiscard]] std::vector<Region>& mutable_regions() { return regions_; }
    // Stops and joins the fault thread (idempotent).
    void stop();

    // ── Recovery (post-copy link lost; pager/link.cpp) ──
    // The fault thread keeps running while the link is down: a fault on a MISSING page
    // still marks it (and its prefetch window) REQUESTED, but nothing is queued — the
    // page-state table is the only record, so nothing grows while the link is down. A
    // request that waited for room is dropped (its pages stay REQUESTED).
    // detach_outbox() returns once the fault thread no longer touches the old outbox
    // (at most `limit`; ETIMEDOUT otherwise). The fault thread also detaches by itself
    // when a send on the outbox fails, and reports that error through on_error.
    [[nodiscard]] Result<void> detach_outbox(std::chrono::milliseconds limit = std::chrono::seconds(10));
    // Gives the fault thread the new link's outbox. The caller then asks again for
    // requested_runs() (a page REQUESTED before the attach may never have been asked for
    // on this link; one asked twice is placed once).
    [[nodiscard]] Result<void> attach_outbox(net::Outbox& out, std::chrono::milliseconds limit = std::chrono::seconds(10));
    // Runs of REQUESTED pages, at most kMaxPagesPerFrame each, as PAGE_REQUESTs.
    [[nodiscard]] std::vector<proto::PageRequest> requested_runs() const;
    // Runs of pages not here (MISSING, REQUESTED, PLACING: neither PRESENT nor STAGED),
    // at most UINT32_MAX pages each: what the source must send again.
    [[nodiscard]] std::vector<proto::StaleRun> lacking_runs() const;

    // Places pages [first, first+count) of region `ri` (Placer::place). `data` holds the
    // non-zero pages back to back, in order; zero pages are flagged in `zero`. Pages
    // already placed are counted as duplicates. Returns how many pages this call made present.
    [[nodiscard]] Result<std::uint64_t> place(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                              const std::byte* data, bool demanded);
    // File-backed regions: writes pages into the file and leaves them STAGED (Placer::stage).
    [[nodiscard]] Result<std::uint64_t> stage(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                              const std::byte* data);
    // Pre-copy data (the VM runs at the source): file-backed → stage(); anonymous →
    // UFFDIO_COPY, replacing a copy of an earlier round. REQUIRES: the VM does not run here.
    [[nodiscard]] Result<std::uint64_t> precopy(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                                const std::byte* data);
    // Maps the STAGED pages of the range (one CONTINUE per run); returns how many.
    [[nodiscard]] Result<std::uint64_t> map_staged(std::uint32_t ri, std::uint64_t first, std::uint64_t count);
    // Stale pages (dirtied on the source after they were sent): PRESENT and STAGED pages of
    // the range go back to MISSING, so the next access faults and fetches them again.
    // Zaps the guest mapping first (MADV_DONTNEED; a file keeps its page cache, whose
    // stale bytes are overwritten on arrival). Returns how many pages went back.
    // REQUIRES: vCPUs paused, and no placement of these pages in flight (see page_state.hpp).
    [[nodiscard]] Result<std::uint64_t> make_missing(std::uint32_t ri, std::uint64_t first, std::uint64_t count);

    // The most pages one fault may request (1..kMaxPagesPerFrame); takes effect at the next fault.
    void set_prefetch(std::uint32_t pages) {
        prefetch_max_.store(std::clamp<std::uint32_t>(pages, 1, proto::kMaxPagesPerFrame), std::memory_order_relaxed);
    }
    [[nodiscard]] std::uint64_t total_pages() const { return total_pages_; }
    // Present, or discarded by the VMM (UFFD_EVENT_REMOVE: such a page reads zero, with a
    // zero page placed at its next fault, or the kernel's once finish() unregistered it).
    [[nodiscard]] std::uint64_t present_pages() const { return present_.load(std::memory_order_acquire); }
    [[nodiscard]] bool complete() const { return present_pages() == total_pages_; }
    // Called once, by the thread whose placement made the last page present.
    void on_complete(std::function<void()> fn) { on_complete_ = std::move(fn); }

    // Back-replication (hybrid): write tracking for the destination's epochs.
    // The uffd is opened at create() with UFFD_FEATURE_WP_ASYNC (and WP_UNPOPULATED for
    // anonymous regions, WP_HUGETLBFS_SHMEM for files) whenever the kernel has them: the
    // features must be chosen at UFFDIO_API, before the mode is known (HELLO), and cost
    // nothing while no range is registered for WP. track_writes() then re-registers every
    // region with the same uffd in its mode plus UFFDIO_REGISTER_MODE_WP (the kernel
    // replaces a range's modes when the same uffd registers it again), makes the placer
    // map pages write-protected from then on, and write-protects every region (markers
    // on pages not yet present: a later MISSING/MINOR fault still reaches the fault
    // thread). Post-copy mode never calls it and pays nothing.
    // Fails with a sentence naming the missing feature when the kernel lacks one.
    // REQUIRES: vCPUs paused; created, not adopted.
    [[nodiscard]] Result<void> track_writes();
    // Whether track_writes() can work here: the error names the missing feature.
    [[nodiscard]] Result<void> can_track_writes() const;
    [[nodiscard]] bool tracking_writes() const { return tracking_writes_; }

    // Every page present: unregisters the regions; the guest memory is plain memory again.
    [[nodiscard]] Result<void> finish();
    // The source is gone: poisons every page that never arrived so a touch raises SIGBUS
    // instead of reading zeroes, and wakes threads blocked on them. Returns how many.
    [[nodiscard]] Result<std::uint64_t> poison_missing();

    [[nodiscard]] const std::vector<Region>& regions() const { return regions_; }
    [[nodiscard]] std::span<const GuestRegion> guest_regions() const { return guest_; }
    [[nodiscard]] PagerStats& stats() { return stats_; }
    [[nodiscard]] const PlacerCounters& placer_counters() const { return placer_->counters(); }
    // For benchmarks: the claim chunk in pages. REQUIRES: before any placement.
    void set_place_chunk(std::uint32_t pages) { placer_->set_chunk(pages); }
    // Names the VMM's vCPU threads for blocktime (any thread; replaces the earlier list).
    void set_vcpu_threads(std::vector<VcpuThread> threads) { blocktime_->set_names(std::move(threads)); }
    // Blocktime per faulting thread; available = false without UFFD_FEATURE_THREAD_ID.
    [[nodiscard]] BlocktimeReport blocktime() const { return blocktime_->report(); }
    // The fault-latency histogram: non-empty buckets, ascending.
    [[nodiscard]] std::vector<LatencyBucket> fault_latency_buckets() const { return stats_.fault_latency.buckets(); }
    [[nodiscard]] const uffd::Uffd& uffd() const { return uffd_; }
    // Bytes of the pager's own bookkeeping (state table + fault stamps).
    [[nodiscard]] std::size_t overhead_bytes() const;
    [[nodiscard]] std::uint32_t now_us() const override;

private:
    Pager() = default;
    static Region make_region(const GuestRegion& g);
    void make_placer();
    // Reads a batch of uffd messages; with a RemoveGate, under it, applying REMOVE events.
    Result<std::size_t> read_batch();
    std::uint64_t apply_remove(const uffd::Event& ev);
    void fault_thread();
    Result<void> handle_fault(const uffd::Event& ev);
    Result<void> post_request();
    // PlaceObserver: fault latency and blocktime of a run that became present.
    void placed(Region& r, std::uint32_t ri, std::uint64_t first, std::uint64_t count, std::uint32_t at_us) override;
    void add_present(std::uint64_t n);

    std::vector<Region> regions_;
    std::vector<GuestRegion> guest_;
    std::uint64_t total_pages_ = 0;
    std::string wp_missing_ = "created before the kernel was probed";  // empty: WP features enabled
    bool tracking_writes_ = false;
    std::atomic<std::uint64_t> present_{0};
    std::atomic<std::uint32_t> prefetch_max_{16};
    uffd::Uffd uffd_;
    std::vector<std::byte> zero_page_;  // one zero page of the largest size: zero writes, zero huge pages
    std::function<void()> on_complete_;
    // Fault thread only: the outbox, a request it had no room for, and the fault
    // messages read after it that wait for it.
    net::Outbox* outbox_ = nullptr;  // null while the link is down
    RequestSink* sink_ = nullptr;
    // Handing the fault thread another outbox (link.cpp): under link_mu_, next_outbox_
    // and a generation the fault thread acknowledges at the top of its loop.
    std::mutex link_mu_;
    std::condition_variable link_cv_;
    net::Outbox* next_outbox_ = nullptr;
    std::uint64_t link_gen_ = 0, link_seen_ = 0;
    bool fault_thread_done_ = false;
    net::Fd wake_fd_;  // eventfd: ends the fault thread's poll for a handover
    std::optional<proto::Frame> pending_;
    std::array<uffd::Event, 64> batch_;
    std::size_t batch_pos_ = 0, batch_len_ = 0;
    std::function<void(const Error&)> on_error_;
    net::ShutdownEvent stop_event_;
    std::thread thread_;
    PagerStats stats_;
    std::unique_ptr<Blocktime> blocktime_;
    std::unique_ptr<RemoveGate> gate_;  // adopted uffd with EVENT_REMOVE only
    std::unique_ptr<Placer> placer_;  // after regions_, zero_page_ and stats_, which it uses
    std::chrono::steady_clock::time_point epoch_ = std::chrono::steady_clock::now();
};

// Receives frames on one channel until it closes or fails. PAGES frames are verified
// (checksum, bounds) and placed, PRECOPY_PAGES alike and given to Pager::precopy(); every other frame goes to `on_control`, which returns
// false to stop. A frame that fails verification ends the loop with an error and none
// of its pages is placed.
using ControlHandler = std::function<Result<bool>(const proto::Header&, std::vector<std::byte>)>;
// PRECOPY_PAGES are accepted only while *precopy_open (a flag of the receiving thread,
// cleared by on_control at PRECOPY_END); null: never.
[[nodiscard]] Result<void> receive_loop(net::FrameReader& reader, Pager& pager, bool demanded,
                                        const ControlHandler& on_control, const bool* precopy_open = nullptr);

}  // namespace lazymig::pager
