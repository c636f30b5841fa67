// pagemap_scan.hpp — which pages of a write-protected range were written, from the kernel.
//
//   auto scan = PagemapScan::open();          // probes PAGEMAP_SCAN (Linux 6.7+)
//   scan->written(host, size, page_size, [&](std::uint64_t first, std::uint64_t count) { ... });
//
// One PAGEMAP_SCAN ioctl per kVec written runs, with PM_SCAN_WP_MATCHING |
// PM_SCAN_CHECK_WPASYNC and category PAGE_IS_WRITTEN: the kernel reports the pages
// written since the previous scan (or since they were write-protected) and protects
// them again in the same walk, so a write after the walk passed a page is reported by
// the next scan. The range must be registered with a userfaultfd opened with
// UFFD_FEATURE_WP_ASYNC in mode WP (CHECK_WPASYNC makes the kernel refuse, EPERM, a
// range that is not). Shared by the source's dirty tracker (pre-copy) and the
// destination's epochs (back-replication).
//
// Threads: one PagemapScan per scanning thread (it owns a result vector).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>

#include "lazymig/error.hpp"

namespace lazymig {

class PagemapScan {
public:
    // Opens /proc/self/pagemap and checks that the kernel has PAGEMAP_SCAN; the error
    // names what is missing.
    [[nodiscard]] static Result<PagemapScan> open();
    PagemapScan() = default;
    PagemapScan(PagemapScan&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
    PagemapScan& operator=(PagemapScan&& o) noexcept;
    PagemapScan(const PagemapScan&) = delete;
    PagemapScan& operator=(const PagemapScan&) = delete;
    ~PagemapScan();

    // Calls fn(first_page, count) for each run of pages of [host, host+size) written
    // since the last scan, in address order, and write-protects them again. `page_size`
    // is the range's page size (a huge page reports its whole extent). `what` names the
    // range in errors ("region 0 'ram0'").
    [[nodiscard]] Result<void> written(void* host, std::size_t size, std::size_t page_size, std::string_view what,
                                       const std::function<void(std::uint64_t, std::uint64_t)>& fn);

private:
    struct Run {
        std::uint64_t start, end, categories;  // the kernel's struct page_region
    };
    explicit PagemapScan(int fd) : fd_(fd) {}
    int fd_ = -1;
    std::array<Run, 512> vec_{};
};

}  // namespace lazymig
