// The Pager's side of placement: present counts, completion, fault latency and blocktime
// around the Placer (pager/placer.hpp), and stale pages going back to MISSING.
#include <sys/mman.h>

#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/log.hpp"

namespace lazymig::pager {

Result<std::uint64_t> Pager::place(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                   const std::byte* data, bool demanded) {
    auto out = placer_->place(ri, first, count, zero, data);
    if (!out) return std::unexpected(out.error());
    stats_.zero.add(out->zeros);
    stats_.duplicate.add(out->duplicates);
    (demanded ? stats_.demanded_pages : stats_.pushed_pages).add(out->placed);
    add_present(out->placed - out->removed);
    return out->placed;
}

Result<std::uint64_t> Pager::map_claimed(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                         const std::byte* data, bool demanded) {
    auto n = placer_->map_claimed(ri, first, count, zero, data);
    if (!n) return std::unexpected(n.error());
    for (std::uint32_t i = 0; i < count; ++i) stats_.zero.add(zero[i]);
    (demanded ? stats_.demanded_pages : stats_.pushed_pages).add(*n);
    add_present(*n);
    return *n;
}

Result<std::uint64_t> Pager::stage(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                   const std::byte* data) {
    auto out = placer_->stage(ri, first, count, zero, data);
    if (!out) return std::unexpected(out.error());
    stats_.zero.add(out->zeros);
    stats_.duplicate.add(out->duplicates);
    stats_.precopy_pages.add(out->placed);
    return out->placed;
}

Result<std::uint64_t> Pager::precopy(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                     const std::byte* data) {
    if (ri >= regions_.size()) return logic_error(fmt::format("pager: pre-copy pages for region {} of {}", ri, regions_.size()));
    if (regions_[ri].file_backed()) return stage(ri, first, count, zero, data);
    // Anonymous: a page sent again replaces the copy placed in an earlier round, which
    // UFFDIO_COPY cannot overwrite: drop that one first. Nothing runs on this memory yet.
    if (auto m = make_missing(ri, first, count); !m) return m;
    auto out = placer_->place(ri, first, count, zero, data);
    if (!out) return std::unexpected(out.error());
    stats_.zero.add(out->zeros);
    stats_.duplicate.add(out->duplicates);
    stats_.precopy_pages.add(out->placed);
    add_present(out->placed);
    return out->placed;
}

Result<std::uint64_t> Pager::map_staged(std::uint32_t ri, std::uint64_t first, std::uint64_t count) {
    auto n = placer_->map_staged(ri, first, count);
    if (n) add_present(*n);
    return n;
}

void Pager::add_present(std::uint64_t n) {
    if (n && present_.fetch_add(n, std::memory_order_acq_rel) + n == total_pages_) {
        LZ_LOG(info, "pager_all_present", "pages={}", total_pages_);
        if (on_complete_) on_complete_();
    }
}

void Pager::placed(Region& r, std::uint32_t ri, std::uint64_t first, std::uint64_t count, std::uint32_t now) {
    for (std::uint64_t p = first; p < first + count; ++p) {
        if (const std::uint32_t at = r.fault_at[p].exchange(0, std::memory_order_relaxed); at != 0) {
            // A fault seen while this placement was under way is stamped after `now`:
            // it waited for nothing, so it counts as zero, never as a wrapped 2^32.
            const auto waited = static_cast<std::int32_t>(now - at);
            stats_.fault_latency.record(waited > 0 ? std::uint64_t(waited) * 1000 : 0);
        }
    }
    blocktime_->placed(ri, first, count, now);
}

Result<std::uint64_t> Pager::make_missing(std::uint32_t ri, std::uint64_t first, std::uint64_t count) {
    if (ri >= regions_.size()) return logic_error(fmt::format("pager: make_missing in region {} of {}", ri, regions_.size()));
    Region& r = regions_[ri];
    if (first > r.pages || count > r.pages - first)
        return logic_error(fmt::format("pager: make_missing of pages {}+{} of region {} '{}' ({} pages)", first, count,
                                       ri, r.guest.name, r.pages));
    // Zap first: a page marked MISSING while still mapped could be read stale, and an
    // anonymous UFFDIO_COPY over it would fail with EEXIST and count it as placed. A
    // file's STAGED pages were never mapped: a range without PRESENT pages needs no zap
    // (the hybrid switchover's stale pages of a memfd guest: no stop-the-world discard).
    bool mapped = false;
    for (std::uint64_t p = first; p < first + count && !mapped; ++p) mapped = r.state.get(p) == PageState::present;
    if (mapped && ::madvise(r.host(first), count * r.guest.page_size, MADV_DONTNEED) != 0) {
        const int e = errno;
        return sys_error(fmt::format("pager: madvise(MADV_DONTNEED) pages {}+{} of region {} '{}'", first, count, ri,
                                     r.guest.name),
                         e);
    }
    std::uint64_t back = 0, were_present = 0;
    for (std::uint64_t p = first; p < first + count; ++p) {
        const bool present = r.state.get(p) == PageState::present;
        if (r.state.make_missing(p)) {
            ++back;
            were_present += present;
        }
    }
    present_.fetch_sub(were_present, std::memory_order_acq_rel);
    LZ_LOG(debug, "pager_make_missing", "region={} first={} count={} back={}", ri, first, count, back);
    return back;
}

}  // namespace lazymig::pager
