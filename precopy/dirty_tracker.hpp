// precopy/dirty_tracker.hpp — which guest pages were written since the last look.
//
//   DirtySet dirty(regions);
//   auto t = make_dirty_tracker(regions, DirtyTracking::wp_async, {});  // probes the kernel
//   if (!t) return fail(t.error());
//   (*t)->start();            // from here every write is recorded
//   ... send every page ...
//   (*t)->collect(dirty);     // ORs in the pages written since start(), re-arms them
//
// The contract, for every method: a write that completes after collect() N returned (or
// after start()) is reported by collect() N+1 or a later one; a page may be reported
// when it was not written (never the other way round). The caller reads a page only
// after the collect() that reported it returned, so what it reads is at least as new as
// the write.
//
// Methods (SourceConfig::dirty_tracking):
//   wp_async  userfaultfd write-protect with UFFD_FEATURE_WP_ASYNC: the kernel resolves
//             a write to a protected page itself (no thread, no fault message) and marks
//             the PTE written; collect() is one PAGEMAP_SCAN ioctl per region that returns
//             the written pages and write-protects them again in the same walk
//             (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, category PAGE_IS_WRITTEN).
//             Linux 6.7+. Anonymous memory also needs WP_UNPOPULATED (6.5) so that pages
//             never touched are protected too; memfd and hugetlbfs need WP_HUGETLBFS_SHMEM.
//   wp_sync   userfaultfd write-protect without WP_ASYNC: a write to a protected page
//             blocks its thread; the tracker's own thread reads the fault, un-protects the
//             page (which wakes the writer) and records it. collect() takes the records
//             and protects those pages again. Costs a fault round trip per page per round
//             (~12 µs here): the fallback for kernels without WP_ASYNC.
//   vmm       the VMM's own log (SourceConfig::dirty_log: a KVM dirty bitmap or ring).
//
// Only writes through the guest mapping are seen by the write-protect methods; a VMM
// that writes guest RAM through the memfd with write(2) must log those itself (vmm).
//
// Threads: start(), collect() and stop() from one thread (the pre-copy loop); wp_sync
// owns one thread from start() to stop().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "lazymig/lazymig.hpp"

namespace lazymig::source {

// A bit per page of every region.
class DirtySet {
public:
    explicit DirtySet(std::span<const GuestRegion> regions);
    void set(std::uint32_t region, std::uint64_t page) { words_[region][page / 64] |= 1ull << (page % 64); }
    void set_range(std::uint32_t region, std::uint64_t first, std::uint64_t count);
    void reset(std::uint32_t region, std::uint64_t page) { words_[region][page / 64] &= ~(1ull << (page % 64)); }
    [[nodiscard]] bool test(std::uint32_t region, std::uint64_t page) const {
        return words_[region][page / 64] >> (page % 64) & 1;
    }
    [[nodiscard]] std::uint64_t count() const;
    void clear();
    [[nodiscard]] std::size_t regions() const { return words_.size(); }
    [[nodiscard]] std::uint64_t pages(std::uint32_t region) const { return pages_[region]; }
    // Calls fn(first, count) for each run of set pages of `region`, in address order.
    void for_each_run(std::uint32_t region, const std::function<void(std::uint64_t, std::uint64_t)>& fn) const;
    [[nodiscard]] std::span<std::uint64_t> words(std::uint32_t region) { return words_[region]; }
    [[nodiscard]] std::span<const std::uint64_t> words(std::uint32_t region) const { return words_[region]; }

private:
    std::vector<std::vector<std::uint64_t>> words_;
    std::vector<std::uint64_t> pages_;
};

class DirtyTracker {
public:
    virtual ~DirtyTracker() = default;
    [[nodiscard]] virtual DirtyTracking method() const = 0;
    // Arms every page of every region. REQUIRES: not started.
    [[nodiscard]] virtual Result<void> start() = 0;
    // ORs into `out` every page written since start() or the previous collect(), and
    // arms those pages again. REQUIRES: started.
    [[nodiscard]] virtual Result<void> collect(DirtySet& out) = 0;
    // Stops tracking: writes run free again (a writer blocked on wp_sync is released).
    // Idempotent; the destructor calls it.
    virtual void stop() noexcept = 0;
};

// What the kernel offers for `method` and `regions`, probed without touching them: ok,
// or an error naming the missing feature ("userfaultfd: kernel lacks WP_ASYNC").
[[nodiscard]] Result<void> probe_dirty_tracking(std::span<const GuestRegion> regions, DirtyTracking method);

// `automatic` chooses vmm when `vmm_log` is set, else wp_async when the kernel has it,
// else wp_sync. An explicit method that cannot work here is an error naming why.
// The tracker keeps its own copy of the region table.
[[nodiscard]] Result<std::unique_ptr<DirtyTracker>> make_dirty_tracker(std::span<const GuestRegion> regions,
                                                                       DirtyTracking method, DirtyLogFn vmm_log);

}  // namespace lazymig::source
