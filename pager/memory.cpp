// Destination guest memory: uffd registration, fresh files, teardown.
#include <fcntl.h>
#include <sys/mman.h>

#include <fmt/format.h>

#include "pager/apply_range.hpp"
#include "pager/pager.hpp"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; Debian 12's glibc headers may lack it
#endif
#include "src/log.hpp"
#include "src/region.hpp"

namespace lazymig::pager {
namespace {

std::uint64_t features_for(std::span<const GuestRegion> regions) {
    std::uint64_t f = 0;
    for (const auto& r : regions) {
        if (r.fd >= 0)
            f |= r.backing == Backing::hugetlbfs ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM;
        else if (r.backing == Backing::hugetlbfs)
            f |= UFFD_FEATURE_MISSING_HUGETLBFS;
    }
    return f;
}

std::uint64_t wp_features_for(std::span<const GuestRegion> regions) {
    std::uint64_t f = UFFD_FEATURE_WP_ASYNC;
    for (const auto& r : regions) f |= r.fd >= 0 ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : UFFD_FEATURE_WP_UNPOPULATED;
    return f;
}

}  // namespace

Result<void> Pager::can_track_writes() const {
    if (!wp_missing_.empty())
        return logic_error(fmt::format("destination: hybrid mode back-replicates the pages the VM writes here, which "
                                       "needs userfaultfd write-protect with WP_ASYNC; the kernel lacks {} (Linux 6.7+)",
                                       wp_missing_));
    return {};
}

Result<void> Pager::track_writes() {
    if (tracking_writes_) return {};
    if (auto c = can_track_writes(); !c) return c;
    for (std::size_t i = 0; i < regions_.size(); ++i) {
        const auto& g = regions_[i].guest;
        const std::string where = fmt::format("destination region {} '{}': write tracking", i, g.name);
        const std::uint64_t mode = (g.fd >= 0 ? UFFDIO_REGISTER_MODE_MINOR : UFFDIO_REGISTER_MODE_MISSING) |
                                   UFFDIO_REGISTER_MODE_WP;
        auto ioctls = uffd_.register_range(g.host, g.size, mode);
        if (!ioctls) return std::unexpected(ioctls.error().wrap(where));
        if (!(*ioctls & (1ull << _UFFDIO_WRITEPROTECT)))
            return logic_error(fmt::format("{}: the kernel offers no UFFDIO_WRITEPROTECT on this mapping", where));
    }
    placer_->set_write_protect(true);
    for (std::size_t i = 0; i < regions_.size(); ++i) {
        const auto& g = regions_[i].guest;
        if (auto w = uffd_.writeprotect(g.host, g.size, true); !w)
            return std::unexpected(w.error().wrap(fmt::format("destination region {} '{}': write tracking", i, g.name)));
    }
    tracking_writes_ = true;
    LZ_LOG(info, "pager_track_writes", "regions={}", regions_.size());
    return {};
}

Result<std::unique_ptr<Pager>> Pager::create(std::span<const GuestRegion> regions, std::uint32_t prefetch_pages,
                                             bool allow_user_mode_only) {
    if (auto v = validate_regions(regions, "destination"); !v) return std::unexpected(v.error());
    std::unique_ptr<Pager> p(new Pager());
    p->set_prefetch(prefetch_pages);
    auto stop = net::ShutdownEvent::create();
    if (!stop) return std::unexpected(stop.error());
    p->stop_event_ = std::move(*stop);

    // THREAD_ID when the kernel has it: blocktime per faulting thread. Without it the
    // pager still works and blocktime says it is unavailable.
    auto probed = uffd::Uffd::probe();
    if (!probed) return std::unexpected(probed.error().wrap("destination"));
    const bool thread_id = probed->has(UFFD_FEATURE_THREAD_ID);
    // Write tracking for hybrid's back-replication (track_writes()), when the kernel has it.
    const std::uint64_t wp = wp_features_for(regions);
    const bool with_wp = probed->has(wp);
    p->wp_missing_ = with_wp ? "" : probed->missing(wp);
    auto u = uffd::Uffd::open(features_for(regions) | (thread_id ? UFFD_FEATURE_THREAD_ID : 0) | (with_wp ? wp : 0));
    if (!u) return std::unexpected(u.error().wrap("destination"));
    if (u->features().user_mode_only) {
        if (!allow_user_mode_only)
            return logic_error("destination: only user-mode-only userfaultfd is permitted here, under which a kernel "
                               "access to a missing page (vhost, O_DIRECT into guest RAM, a syscall's buffer) fails "
                               "with EFAULT instead of waiting; grant full userfaultfd (`sysctl "
                               "vm.unprivileged_userfaultfd=1`, read-write access to /dev/userfaultfd, or "
                               "CAP_SYS_PTRACE) or set allow_user_mode_only");
        LZ_LOG(warn, "pager_user_mode_only", "userfaultfd catches user-mode faults only (allow_user_mode_only): a "
               "kernel access to a missing page fails with EFAULT");
    }
    p->uffd_ = std::move(*u);
    p->blocktime_ = std::make_unique<Blocktime>(thread_id);
    if (!thread_id) LZ_LOG(warn, "pager_no_thread_id", "the kernel lacks UFFD_FEATURE_THREAD_ID: blocktime per thread is unavailable");

    for (std::size_t i = 0; i < regions.size(); ++i) {
        const auto& g = regions[i];
        Region r = make_region(g);
        const std::string where = fmt::format("destination region {} '{}'", i, g.name);
        std::uint64_t mode = UFFDIO_REGISTER_MODE_MISSING;
        if (g.fd >= 0) {
            // A fresh file: punch out whatever the VMM may have written, then allocate the
            // whole range, so every page reads zero (a zero page arriving needs no write),
            // every guest fault is a MINOR fault (the page is in the page cache, not yet
            // mapped) and arriving data needs no allocation.
            const auto off = static_cast<off_t>(g.fd_offset), len = static_cast<off_t>(g.size);
            if (::fallocate(g.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) != 0) {
                const int e = errno;
                return sys_error(fmt::format("{}: fallocate(PUNCH_HOLE) {} bytes at offset {} of the guest memory file",
                                             where, g.size, g.fd_offset), e);
            }
            if (::fallocate(g.fd, 0, off, len) != 0) {
                const int e = errno;
                return sys_error(fmt::format("{}: fallocate {} bytes of guest memory", where, g.size), e);
            }
            r.may_hold_data = std::make_unique<std::atomic<std::uint64_t>[]>((r.pages + 63) / 64);
            mode = UFFDIO_REGISTER_MODE_MINOR;
        }
        // The guest mapping must hold no page yet: drop whatever the VMM may have touched
        // (for a file this only unmaps; the file's pages stay).
        if (::madvise(g.host, g.size, MADV_DONTNEED) != 0) {
            const int e = errno;
            return sys_error(fmt::format("{}: madvise(MADV_DONTNEED) the guest mapping", where), e);
        }
        auto ioctls = p->uffd_.register_range(g.host, g.size, mode);
        if (!ioctls) return std::unexpected(ioctls.error().wrap(where));
        const std::uint64_t need = g.fd >= 0 ? (1ull << _UFFDIO_CONTINUE) : (1ull << _UFFDIO_COPY);
        if ((*ioctls & need) != need)
            return logic_error(fmt::format("{}: the kernel offers no UFFDIO_{} on this mapping", where,
                                           g.fd >= 0 ? "CONTINUE" : "COPY"));
        // Last step of the region: nothing after it can fail and leak the mapping.
        if (g.backing == Backing::hugetlbfs) {
            // hugetlbfs has no write(2) (pwrite fails with EINVAL): its pages are copied
            // in through a second mapping, populated for writing now — one fault per
            // 2 MiB page here instead of on the placement path.
            void* a = ::mmap(nullptr, g.size, PROT_READ | PROT_WRITE, MAP_SHARED, g.fd, static_cast<off_t>(g.fd_offset));
            if (a == MAP_FAILED) {
                const int e = errno;
                return sys_error(fmt::format("{}: mmap the hugetlbfs write alias", where), e);
            }
            r.alias = static_cast<std::byte*>(a);
            if (::madvise(a, g.size, MADV_POPULATE_WRITE) != 0) {
                const int e = errno;
                ::munmap(a, g.size);
                r.alias = nullptr;
                return sys_error(fmt::format("{}: madvise(MADV_POPULATE_WRITE) the hugetlbfs write alias", where), e);
            }
        }
        p->total_pages_ += r.pages;
        p->regions_.push_back(std::move(r));
        p->guest_.push_back(g);
        LZ_LOG(info, "pager_region", "region={} name={} size={} page={} backing={} placement={}", i, g.name,
               g.size, g.page_size, to_string(g.backing), g.fd >= 0 ? "continue" : "copy");
    }
    p->make_placer();
    return p;
}

Region Pager::make_region(const GuestRegion& g) {
    Region r;
    r.guest = g;
    r.pages = g.size / g.page_size;
    r.state = PageStateTable(r.pages);
    r.fault_at = std::make_unique<std::atomic<std::uint32_t>[]>(r.pages);
    return r;
}

void Pager::make_placer() {
    std::size_t largest = 4096;
    for (const auto& g : guest_) largest = std::max(largest, g.page_size);
    zero_page_.assign(largest, std::byte{0});  // written: populated
    placer_ = std::make_unique<Placer>(uffd_, std::span(regions_), static_cast<PlaceObserver&>(*this), zero_page_);
    placer_->set_remove_gate(gate_.get());
}

Result<std::unique_ptr<Pager>> Pager::adopt(uffd::Uffd uffd, std::span<const GuestRegion> regions,
                                            std::uint32_t prefetch_pages) {
    if (auto v = validate_regions(regions, "destination"); !v) return std::unexpected(v.error());
    for (std::size_t i = 0; i < regions.size(); ++i)
        if (regions[i].fd >= 0)
            return logic_error(fmt::format("destination region {} '{}': a handed-over userfaultfd is served with "
                                           "UFFDIO_COPY into the VMM's memory; give fd -1 (the VMM's file is not shared)",
                                           i, regions[i].name));
    std::unique_ptr<Pager> p(new Pager());
    p->set_prefetch(prefetch_pages);
    auto stop = net::ShutdownEvent::create();
    if (!stop) return std::unexpected(stop.error());
    p->stop_event_ = std::move(*stop);
    p->uffd_ = std::move(uffd);
    p->wp_missing_ = "nothing: the userfaultfd was handed over (DestinationConfig::uffd), and lazymig registers "
                     "nothing on one";
    const std::uint64_t features = p->uffd_.enabled_features();
    p->blocktime_ = std::make_unique<Blocktime>((features & UFFD_FEATURE_THREAD_ID) != 0);
    if (features & UFFD_FEATURE_EVENT_REMOVE) p->gate_ = std::make_unique<RemoveGate>();
    for (std::size_t i = 0; i < regions.size(); ++i) {
        Region r = make_region(regions[i]);
        if (p->gate_) r.removed = std::make_unique<std::atomic<std::uint64_t>[]>((r.pages + 63) / 64);
        p->total_pages_ += r.pages;
        p->regions_.push_back(std::move(r));
        p->guest_.push_back(regions[i]);
        LZ_LOG(info, "pager_region_adopted", "region={} name={} host={} size={} page={}", i, regions[i].name,
               regions[i].host, regions[i].size, regions[i].page_size);
    }
    LZ_LOG(info, "pager_adopt", "fd={} features={}", p->uffd_.fd(), uffd::feature_name(features));
    p->make_placer();
    return p;
}

Pager::~Pager() {
    stop();
    for (auto& r : regions_)
        if (r.alias) ::munmap(r.alias, r.guest.size);
}

std::size_t Pager::overhead_bytes() const {
    std::size_t n = 0;
    for (const auto& r : regions_)
        n += r.state.bytes() + r.pages * sizeof(std::uint32_t) + (r.may_hold_data ? (r.pages + 63) / 64 * 8 : 0);
    return n + zero_page_.size() + (blocktime_ ? blocktime_->bytes() : 0);
}

std::uint32_t Pager::now_us() const {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - epoch_).count();
    return static_cast<std::uint32_t>(us) | 1u;  // never 0, which means "no fault seen"
}

Result<void> Pager::finish() {
    stop();
    for (std::size_t i = 0; i < regions_.size(); ++i) {
        auto& r = regions_[i];
        if (auto u = uffd_.unregister_range(r.guest.host, r.guest.size); !u)
            return std::unexpected(u.error().wrap(fmt::format("destination region {} '{}'", i, r.guest.name)));
        if (r.alias) ::munmap(r.alias, r.guest.size);
        r.alias = nullptr;
    }
    uffd_.close();
    LZ_LOG(info, "pager_finish", "pages={} duplicates={}", total_pages_, stats_.duplicate.get());
    return {};
}

Result<std::uint64_t> Pager::poison_missing() {
    if (!uffd_.features().has(UFFD_FEATURE_POISON))
        return logic_error("cannot poison pages that never arrived: the kernel lacks userfaultfd POISON; "
                           "threads blocked on them stay blocked");
    // Pages that did arrive but are not mapped yet (pre-copied, STAGED: the fault thread
    // maps one on a fault, and it may be gone) are good: mapped first, so a vCPU blocked
    // on one goes on. Counted present without on_complete: the session is ending.
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
        if (!regions_[ri].file_backed()) continue;
        auto n = placer_->map_staged(ri, 0, regions_[ri].pages);
        if (!n) return std::unexpected(n.error().wrap("mapping the staged pages before poisoning the rest"));
        present_.fetch_add(*n, std::memory_order_acq_rel);
    }
    // Hybrid: write tracking protected every page, the missing ones too (uffd-wp PTE
    // markers, WP_UNPOPULATED), and UFFDIO_POISON refuses to overwrite any marker
    // (EEXIST): the tracking ends with the session, so it is dropped first — else a vCPU
    // blocked on such a page is never released and never parks.
    if (tracking_writes_)
        for (const auto& r : regions_)
            if (auto w = uffd_.writeprotect(r.guest.host, r.guest.size, false); !w)
                return std::unexpected(w.error().wrap("dropping write tracking before poisoning"));
    std::uint64_t poisoned = 0;
    for (auto& r : regions_) {
        for (std::uint64_t p = 0; p < r.pages;) {
            if (!r.state.claim(p)) {  // present, or being placed right now
                ++p;
                continue;
            }
            std::uint64_t end = p + 1;
            while (end < r.pages && r.state.claim(end)) ++end;
            std::byte* base = r.host(p);
            // A partial poison must not leave the rest of the run fault-blocked forever.
            auto done = detail::apply_range([&](std::size_t off, std::size_t n) { return uffd_.poison(base + off, n); },
                                            (end - p) * r.guest.page_size, r.guest.page_size, "UFFDIO_POISON", base);
            if (!done) return std::unexpected(done.error());
            poisoned += end - p;
            p = end;
        }
    }
    LZ_LOG(warn, "pager_poison", "pages={}", poisoned);
    return poisoned;
}

}  // namespace lazymig::pager
