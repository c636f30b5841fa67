#include "src/pagemap_scan.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <fmt/format.h>

#include "src/errors.hpp"

// PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h) is newer than Debian 12's headers.
// Layout and values from the kernel's uapi; presence is probed at run time (ENOTTY).
#ifndef PAGEMAP_SCAN
namespace {
struct pm_scan_arg {
    std::uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
        category_anyof_mask, return_mask;
};
}  // namespace
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WRITTEN (1 << 1)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif

namespace lazymig {

Result<PagemapScan> PagemapScan::open() {
    const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return LZ_SYS_ERROR("open /proc/self/pagemap");
    // An empty scan: ENOTTY (or EINVAL) says the kernel has no PAGEMAP_SCAN.
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    if (::ioctl(fd, PAGEMAP_SCAN, &arg) < 0) {
        const int e = errno;
        ::close(fd);
        return sys_error("the kernel has no PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7+)", e);
    }
    return PagemapScan(fd);
}

PagemapScan& PagemapScan::operator=(PagemapScan&& o) noexcept {
    if (this != &o) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = o.fd_;
        o.fd_ = -1;
    }
    return *this;
}

PagemapScan::~PagemapScan() {
    if (fd_ >= 0) ::close(fd_);
}

Result<void> PagemapScan::written(void* host, std::size_t size, std::size_t page_size, std::string_view what,
                                  const std::function<void(std::uint64_t, std::uint64_t)>& fn) {
    static_assert(sizeof(Run) == 24, "struct page_region is 3 u64");
    const auto base = reinterpret_cast<std::uint64_t>(host);
    std::uint64_t at = base;
    const std::uint64_t end = base + size;
    while (at < end) {
        pm_scan_arg arg{};
        arg.size = sizeof arg;
        arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
        arg.start = at;
        arg.end = end;
        arg.vec = reinterpret_cast<std::uint64_t>(vec_.data());
        arg.vec_len = vec_.size();
        arg.category_mask = PAGE_IS_WRITTEN;
        arg.return_mask = PAGE_IS_WRITTEN;
        const int n = ::ioctl(fd_, PAGEMAP_SCAN, &arg);
        if (n < 0) return LZ_SYS_ERROR("PAGEMAP_SCAN of {} from {:#x} to {:#x}", what, at, end);
        for (int i = 0; i < n; ++i) {
            // PAGE_SIZE granularity: a huge page reports its whole extent.
            const std::uint64_t first = (vec_[i].start - base) / page_size;
            const std::uint64_t last = (vec_[i].end - base + page_size - 1) / page_size;
            fn(first, last - first);
        }
        if (arg.walk_end <= at)
            return logic_error(fmt::format("PAGEMAP_SCAN of {} made no progress at {:#x}", what, at));
        at = arg.walk_end;
    }
    return {};
}

}  // namespace lazymig
