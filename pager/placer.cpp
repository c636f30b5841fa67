// Placement: claimed pages go into the guest in runs, one ioctl per run.
//
// Anonymous memory: UFFDIO_COPY from the receive buffer (runs of non-zero pages) and
// UFFDIO_ZEROPAGE (runs of zero pages). File-backed memory: the bytes are written
// through the alias mapping, then UFFDIO_CONTINUE maps the whole run, zero or not.
// Either ioctl wakes the vCPUs blocked on the run.
#include <cstring>

#include <fmt/format.h>

#include "pager/apply_range.hpp"
#include "pager/pager.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::pager {

// Pages are claimed and placed a chunk at a time: a vCPU faulting on a page of a large
// pushed frame waits for its chunk, not for the whole frame.
constexpr std::uint32_t kChunk = 64;

Result<std::uint64_t> Pager::place(const proto::PagesMeta& meta, const std::byte* data, bool demanded) {
    Region& r = regions_[meta.region];
    const std::size_t ps = r.guest.page_size;
    std::uint64_t placed = 0, duplicates = 0, zeros = 0;
    const std::byte* next = data;  // the data of page i, when it is non-zero
    for (std::uint32_t c0 = 0; c0 < meta.count; c0 += kChunk) {
        const std::uint32_t c1 = std::min(meta.count, c0 + kChunk);
        std::array<bool, kChunk> mine;
        for (std::uint32_t i = c0; i < c1; ++i) mine[i - c0] = r.state.claim(meta.first + i);
        for (std::uint32_t i = c0; i < c1;) {
            if (!mine[i - c0]) {
                if (!meta.is_zero(i)) next += ps;
                ++duplicates;
                ++i;
                continue;
            }
            // A run of claimed pages; for COPY also of one kind (zero or not).
            const bool zero = meta.is_zero(i);
            std::uint32_t j = i + 1;
            while (j < c1 && mine[j - c0] && (r.alias || meta.is_zero(j) == zero)) ++j;
            const std::uint64_t first = meta.first + i, count = j - i;
            const std::byte* run_data = next;
            if (r.alias) {
                for (std::uint32_t k = i; k < j; ++k) {
                    std::byte* dst = r.alias + (meta.first + k) * ps;
                    if (meta.is_zero(k)) {
                        std::memset(dst, 0, ps);
                    } else {
                        std::memcpy(dst, next, ps);
                        next += ps;
                    }
                }
            } else if (!zero) {
                next += count * ps;
            }
            // The vCPU resumes inside the ioctl: its wait ends now, not when we mark it.
            const std::uint32_t now = now_us();
            auto p = failpoint::check("pager_before_place_run", meta.region, first, static_cast<std::uint32_t>(count))
                         ? Result<void>(sys_error("pager: failpoint pager_before_place_run", EIO))
                         : place_run(r, first, count, zero && !r.alias, run_data);
            if (!p) {
                // Hand the unplaced claims back so a failure path can still poison them.
                for (std::uint32_t k = i; k < c1; ++k)
                    if (mine[k - c0]) r.state.unclaim(meta.first + k);
                return std::unexpected(p.error());
            }
            mark_present(r, first, count, now);
            for (std::uint32_t k = i; k < j; ++k) zeros += meta.is_zero(k);
            placed += count;
            i = j;
        }
    }
    stats_.zero.add(zeros);
    stats_.duplicate.add(duplicates);
    (demanded ? stats_.demanded_pages : stats_.pushed_pages).add(placed);
    if (placed && present_.fetch_add(placed, std::memory_order_acq_rel) + placed == total_pages_) {
        LZ_LOG(info, "pager_all_present", "pages={}", total_pages_);
        if (on_complete_) on_complete_();
    }
    return placed;
}

Result<void> Pager::place_run(Region& r, std::uint64_t first, std::uint64_t count, bool zero, const std::byte* data) {
    std::byte* dst = r.host(first);
    const std::size_t ps = r.guest.page_size, len = count * ps;
    if (r.alias)
        return detail::apply_range([&](std::size_t off, std::size_t n) { return uffd_.continue_range(dst + off, n); }, len, ps,
                     "UFFDIO_CONTINUE", dst);
    if (zero && ps == 4096)
        return detail::apply_range([&](std::size_t off, std::size_t n) { return uffd_.zeropage(dst + off, n); }, len, ps,
                     "UFFDIO_ZEROPAGE", dst);
    if (zero)  // hugetlb has no ZEROPAGE: copy from a zero huge page, one page per ioctl
        return detail::apply_range([&](std::size_t off, std::size_t) { return uffd_.copy(dst + off, zero_page_.data(), ps); },
                     len, ps, "UFFDIO_COPY (zero)", dst);
    return detail::apply_range([&](std::size_t off, std::size_t n) { return uffd_.copy(dst + off, data + off, n); }, len, ps,
                 "UFFDIO_COPY", dst);
}

void Pager::mark_present(Region& r, std::uint64_t first, std::uint64_t count, std::uint32_t now) {
    for (std::uint64_t p = first; p < first + count; ++p) {
        r.state.set_present(p);
        if (const std::uint32_t at = r.fault_at[p].exchange(0, std::memory_order_relaxed); at != 0) {
            // A fault seen while this placement was under way is stamped after `now`:
            // it waited for nothing, so it counts as zero, never as a wrapped 2^32.
            const auto waited = static_cast<std::int32_t>(now - at);
            stats_.fault_latency.record(waited > 0 ? std::uint64_t(waited) * 1000 : 0);
        }
    }
}

}  // namespace lazymig::pager
