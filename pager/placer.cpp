// Placement: claimed pages go into the file in runs (pwritev), then into the guest in
// runs (one ioctl per run). See placer.hpp for the why and the measured costs.
#include "pager/placer.hpp"

#include <limits.h>  // IOV_MAX
#include <sys/uio.h>

#include <array>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "pager/apply_range.hpp"
#include "src/failpoint.hpp"

namespace lazymig::pager {
namespace {

constexpr std::uint32_t kMaxRun = 1024;  // pages per call: one PAGES frame at most
static_assert(kMaxRun <= IOV_MAX, "one pwritev takes every iovec of a run");

}  // namespace

Placer::Placer(uffd::Uffd& uffd, std::span<Region> regions, PlaceObserver& observer, std::span<const std::byte> zero_page,
               std::uint32_t chunk)
    : uffd_(uffd), regions_(regions), observer_(observer), zero_page_(zero_page),
      chunk_(std::clamp<std::uint32_t>(chunk, 1, kMaxRun)) {}

Result<PlaceOutcome> Placer::place(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                   const std::byte* data) {
    return put(ri, first, count, zero, data, End::present);
}

Result<PlaceOutcome> Placer::stage(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                   const std::byte* data) {
    return put(ri, first, count, zero, data, End::staged);
}

Result<PlaceOutcome> Placer::put(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                 const std::byte* data, End end) {
    if (ri >= regions_.size())
        return logic_error(fmt::format("placer: region {} of {}", ri, regions_.size()));
    Region& r = regions_[ri];
    if (first > r.pages || count > r.pages - first || count > kMaxRun || zero.bits.size() * 8 < count)
        return logic_error(fmt::format("placer: pages {}+{} of region {} '{}' ({} pages; at most {} per call)", first,
                                       count, ri, r.guest.name, r.pages, kMaxRun));
    if (end == End::staged && !r.file_backed())
        return logic_error(fmt::format("placer: region {} '{}' is anonymous: pages can only be staged in a file", ri,
                                       r.guest.name));
    const std::size_t ps = r.guest.page_size;
    PlaceOutcome out;
    const std::byte* next = data;  // the data of the chunk's first non-zero page
    std::array<bool, kMaxRun> mine;
    for (std::uint32_t c0 = 0; c0 < count; c0 += chunk_) {
        const std::uint32_t c1 = std::min(count, c0 + chunk_);
        for (std::uint32_t i = c0; i < c1; ++i) mine[i] = r.state.claim(first + i);
        const std::byte* chunk_data = next;
        for (std::uint32_t i = c0; i < c1; ++i) next += zero[i] ? 0 : ps;
        auto unclaim_from = [&](std::uint32_t from) {
            for (std::uint32_t k = from; k < c1; ++k)
                if (mine[k]) r.state.unclaim(first + k);
        };
        if (r.file_backed()) {
            if (auto w = write_runs(r, first + c0, c1 - c0, mine.data() + c0, zero, c0, chunk_data); !w) {
                unclaim_from(c0);
                return std::unexpected(w.error());
            }
        }
        if (end == End::staged) {
            for (std::uint32_t i = c0; i < c1; ++i) {
                if (!mine[i]) {
                    ++out.duplicates;
                    continue;
                }
                r.state.set_staged(first + i);
                ++out.placed;
                out.zeros += zero[i];
            }
            continue;
        }
        const std::byte* run_data = chunk_data;
        for (std::uint32_t i = c0; i < c1;) {
            if (!mine[i]) {
                run_data += zero[i] ? 0 : ps;
                ++out.duplicates;
                ++i;
                continue;
            }
            // A run of claimed pages; for anonymous memory also of one kind (zero or not).
            const bool z = zero[i];
            std::uint32_t j = i + 1;
            while (j < c1 && mine[j] && (r.file_backed() || zero[j] == z)) ++j;
            const std::uint64_t run_first = first + i, run = j - i;
            // The vCPU resumes inside the ioctl: its wait ends now, not when we mark it.
            const std::uint32_t now = observer_.now_us();
            std::unique_lock<std::mutex> gated;  // held until the run is present (RemoveGate)
            if (gate_ && r.removed) gated = std::unique_lock(gate_->mu);
            auto p = failpoint::check("pager_before_place_run", ri, run_first, static_cast<std::uint32_t>(run))
                         ? Result<void>(sys_error("pager: failpoint pager_before_place_run", EIO))
                         : map_run(r, run_first, run, z && !r.file_backed(), run_data, gated ? &gated : nullptr);
            if (!p) {
                // Hand the unplaced claims back so a failure path can still poison them.
                unclaim_from(i);
                return std::unexpected(p.error());
            }
            for (std::uint64_t k = run_first; k < run_first + run; ++k) {
                r.state.set_present(k);
                if (gated) out.removed += r.test_removed(k);  // the bits cannot change while gated
            }
            observer_.placed(r, ri, run_first, run, now);
            for (std::uint32_t k = i; k < j; ++k) {
                out.zeros += zero[k];
                run_data += zero[k] ? 0 : ps;
            }
            out.placed += run;
            i = j;
        }
    }
    return out;
}

// Writes the claimed pages of one chunk that need it: non-zero pages, and zero pages
// whose file page may hold data. One pwritev per contiguous run of such pages; the data
// of consecutive non-zero pages is contiguous in `data` and travels as one iovec.
Result<void> Placer::write_runs(Region& r, std::uint64_t first, std::uint32_t n, const bool* mine, ZeroBits zero,
                                std::uint32_t zero_base, const std::byte* data) {
    const std::size_t ps = r.guest.page_size;
    std::array<bool, kMaxRun> need;
    for (std::uint32_t i = 0; i < n; ++i) {
        need[i] = mine[i] && (!zero[zero_base + i] || r.test_data_bit(first + i));
        // Mapped (or written) from now on, the guest may write it: zero is no longer a given.
        if (mine[i]) r.set_data_bit(first + i);
    }
    std::array<iovec, kMaxRun> iov;
    const std::byte* next = data;
    for (std::uint32_t i = 0; i < n;) {
        if (!need[i]) {
            next += zero[zero_base + i] ? 0 : ps;
            ++i;
            continue;
        }
        std::size_t nv = 0, bytes = 0;
        const std::uint32_t run_start = i;
        for (; i < n && need[i]; ++i) {
            const bool z = zero[zero_base + i];
            const std::byte* src = z ? zero_page_.data() : next;
            if (!z && nv > 0 && static_cast<const std::byte*>(iov[nv - 1].iov_base) + iov[nv - 1].iov_len == src)
                iov[nv - 1].iov_len += ps;
            else
                iov[nv++] = iovec{const_cast<std::byte*>(src), ps};
            bytes += ps;
            (z ? counters_.zero_bytes_written : counters_.bytes_written).add(ps);
            next += z ? 0 : ps;
        }
        if (auto w = write_file(r, first + run_start, std::span(iov.data(), nv), bytes); !w) return w;
    }
    return {};
}

Result<void> Placer::write_file(Region& r, std::uint64_t page, std::span<iovec> iov, std::size_t bytes) {
    const std::size_t ps = r.guest.page_size;
    counters_.write_calls.add();
    if (r.alias) {  // hugetlbfs: no write(2); the alias was populated at set-up
        std::byte* dst = r.alias + page * ps;
        for (const auto& v : iov) {
            std::memcpy(dst, v.iov_base, v.iov_len);
            dst += v.iov_len;
        }
        return {};
    }
    auto off = static_cast<off_t>(r.guest.fd_offset + page * ps);
    std::size_t at = 0;
    while (bytes > 0) {
        const ssize_t n = ::pwritev(r.guest.fd, iov.data() + at, static_cast<int>(iov.size() - at), off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            const int e = n < 0 ? errno : EIO;
            return sys_error(fmt::format("pwritev {} bytes at offset {} of region '{}' (fd {})", bytes, off,
                                         r.guest.name, r.guest.fd),
                             e);
        }
        // A short write (a signal, memory pressure): go on from where it stopped.
        bytes -= static_cast<std::size_t>(n);
        off += n;
        for (auto left = static_cast<std::size_t>(n); left > 0;) {
            if (left >= iov[at].iov_len) {
                left -= iov[at++].iov_len;
            } else {
                iov[at].iov_base = static_cast<std::byte*>(iov[at].iov_base) + left;
                iov[at].iov_len -= left;
                left = 0;
            }
        }
        if (bytes > 0) counters_.write_calls.add();
    }
    return {};
}

Result<void> Placer::map_run(Region& r, std::uint64_t first, std::uint64_t count, bool zero, const std::byte* data,
                             std::unique_lock<std::mutex>* gated) {
    std::byte* dst = r.host(first);
    const std::size_t ps = r.guest.page_size, len = count * ps;
    // Under the RemoveGate: pages the VMM removed get a zero page instead (the op stops
    // at the first removed page and reports partial progress, EAGAIN with done > 0), and
    // EAGAIN with nothing done (a REMOVE is pending) waits for the fault thread's next read.
    auto zero_one = [&](std::size_t off) {
        return ps == 4096 ? uffd_.zeropage(dst + off, ps) : uffd_.copy(dst + off, zero_page_.data(), ps);
    };
    auto counted = [&](auto op) {
        return [&, op](std::size_t off, std::size_t n) -> uffd::IoctlOutcome {
            counters_.map_calls.add();
            if (!gated) return op(off, n);
            const std::uint64_t p0 = first + off / ps, pages = n / ps;
            std::uint64_t k = 0;
            while (k < pages && !r.test_removed(p0 + k)) ++k;
            const std::uint64_t seen = gate_->epoch;
            uffd::IoctlOutcome o = k == 0 ? zero_one(off) : op(off, k * ps);
            const std::size_t asked = k == 0 ? ps : k * ps;
            if (o.ok() && asked < n) o = {asked, EAGAIN};
            if (o.err == EAGAIN && o.done == 0)
                gate_->cv.wait_for(*gated, std::chrono::milliseconds(1), [&] { return gate_->epoch != seen; });
            return o;
        };
    };
    const bool wp = wp_.load(std::memory_order_acquire);
    const std::uint64_t copy_mode = wp ? UFFDIO_COPY_MODE_WP : 0;
    if (r.file_backed())
        return detail::apply_range(counted([&](std::size_t off, std::size_t n) {
                                       return uffd_.continue_range(dst + off, n, wp ? UFFDIO_CONTINUE_MODE_WP : 0);
                                   }),
                                   len, ps, "UFFDIO_CONTINUE", dst);
    if (zero && ps == 4096)
        return detail::apply_range(counted([&](std::size_t off, std::size_t n) { return uffd_.zeropage(dst + off, n); }),
                                   len, ps, "UFFDIO_ZEROPAGE", dst);
    if (zero)  // hugetlb has no ZEROPAGE: copy from a zero huge page, one page per ioctl
        return detail::apply_range(
            counted([&](std::size_t off, std::size_t) { return uffd_.copy(dst + off, zero_page_.data(), ps, copy_mode); }), len, ps,
            "UFFDIO_COPY (zero)", dst);
    return detail::apply_range(
        counted([&](std::size_t off, std::size_t n) { return uffd_.copy(dst + off, data + off, n, copy_mode); }), len, ps,
        "UFFDIO_COPY", dst);
}

Result<std::uint64_t> Placer::map_claimed(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                          const std::byte* data) {
    Region& r = regions_[ri];
    const std::size_t ps = r.guest.page_size;
    for (std::uint32_t i = 0; i < count;) {
        const bool z = zero[i];
        std::uint32_t j = i + 1;
        while (j < count && (r.file_backed() || zero[j] == z)) ++j;
        const std::uint32_t now = observer_.now_us();
        if (r.file_backed())
            for (std::uint32_t k = i; k < j; ++k) r.set_data_bit(first + k);
        if (auto m = map_run(r, first + i, j - i, z && !r.file_backed(), data ? data + std::size_t(i) * ps : nullptr); !m) {
            for (std::uint32_t k = i; k < count; ++k) r.state.unclaim(first + k);
            return std::unexpected(m.error());
        }
        for (std::uint32_t k = i; k < j; ++k) r.state.set_present(first + k);
        observer_.placed(r, ri, first + i, j - i, now);
        i = j;
    }
    return count;
}

Result<std::uint64_t> Placer::map_staged(std::uint32_t ri, std::uint64_t first, std::uint64_t count) {
    if (ri >= regions_.size()) return logic_error(fmt::format("placer: region {} of {}", ri, regions_.size()));
    Region& r = regions_[ri];
    if (first > r.pages || count > r.pages - first)
        return logic_error(fmt::format("placer: map pages {}+{} of region {} '{}' ({} pages)", first, count, ri,
                                       r.guest.name, r.pages));
    std::uint64_t placed = 0;
    const std::uint64_t end = first + count;
    for (std::uint64_t p = first; p < end;) {
        if (!r.state.claim_staged(p)) {
            ++p;
            continue;
        }
        std::uint64_t e = p + 1;
        while (e < end && r.state.claim_staged(e)) ++e;
        const std::uint32_t now = observer_.now_us();
        if (auto m = map_run(r, p, e - p, false, nullptr); !m) {
            for (std::uint64_t k = p; k < e; ++k) r.state.set_staged(k);  // still in the file
            return std::unexpected(m.error());
        }
        for (std::uint64_t k = p; k < e; ++k) r.state.set_present(k);
        observer_.placed(r, ri, p, e - p, now);
        placed += e - p;
        p = e;
    }
    return placed;
}

}  // namespace lazymig::pager
