// PageReader: pread for file-backed regions, process_vm_readv for anonymous ones, or the
// VMM's own reader. One syscall per run of pages; short transfers continue where they
// stopped.
#include "precopy/page_reader.hpp"

#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace lazymig::source {
namespace {

enum class Method : std::uint8_t { invalid = 0, pread_file, vm_readv, vmm };

std::string_view to_string(Method m) {
    switch (m) {
    case Method::pread_file: return "pread";
    case Method::vm_readv: return "process_vm_readv";
    case Method::vmm: return "the VMM's read_pages";
    default: return "invalid";
    }
}

class Reader final : public PageReader {
public:
    Reader(std::span<const GuestRegion> regions, PageReadFn vmm)
        : regions_(regions.begin(), regions.end()), vmm_(std::move(vmm)), pid_(::getpid()) {
        for (const auto& r : regions_)
            methods_.push_back(vmm_ ? Method::vmm : r.fd >= 0 ? Method::pread_file : Method::vm_readv);
    }

    Result<void> read(std::uint32_t region, std::uint64_t first, std::uint32_t count, std::byte* dst) override {
        if (region >= regions_.size())
            return logic_error(fmt::format("page reader: region {} does not exist (there are {})", region,
                                           regions_.size()));
        const GuestRegion& g = regions_[region];
        const std::uint64_t pages = g.size / g.page_size;
        if (count == 0 || first >= pages || count > pages - first)
            return logic_error(fmt::format("page reader: pages {}..{} are outside region {} '{}' ({} pages)", first,
                                           count == 0 ? std::string("(none)") : std::to_string(first + count - 1),
                                           region, g.name, pages));
        const std::size_t len = std::size_t(count) * g.page_size;
        const std::uint64_t offset = first * g.page_size;
        switch (methods_[region]) {
        case Method::pread_file: return read_file(g, region, first, count, offset, dst, len);
        case Method::vm_readv: return read_vm(g, region, first, count, offset, dst, len);
        case Method::vmm: {
            auto r = vmm_(region, offset, std::span(dst, len));
            if (!r)
                return std::unexpected(r.error().wrap(fmt::format("{} for region {} '{}' pages {}..{}",
                                                                  to_string(Method::vmm), region, g.name, first,
                                                                  first + count - 1)));
            return {};
        }
        default: return logic_error("page reader: no method");
        }
    }

    [[nodiscard]] Method method(std::uint32_t region) const { return methods_[region]; }
    [[nodiscard]] const GuestRegion& region(std::uint32_t i) const { return regions_[i]; }

private:
    Result<void> read_file(const GuestRegion& g, std::uint32_t region, std::uint64_t first, std::uint32_t count,
                           std::uint64_t offset, std::byte* dst, std::size_t len) const {
        std::size_t done = 0;
        while (done < len) {
            const off_t at = static_cast<off_t>(g.fd_offset + offset + done);
            const ssize_t n = ::pread(g.fd, dst + done, len - done, at);
            if (n < 0) {
                const int e = errno;
                if (e == EINTR) continue;
                return sys_error(fmt::format("pread of region {} '{}' pages {}..{}: fd {} offset {} ({} of {} bytes read)",
                                             region, g.name, first, first + count - 1, g.fd, at, done, len),
                                 e);
            }
            if (n == 0)
                return logic_error(fmt::format("pread of region {} '{}' pages {}..{}: fd {} ends at offset {}, inside "
                                               "the region (is the file shorter than fd_offset + size?)",
                                               region, g.name, first, first + count - 1, g.fd, at));
            done += static_cast<std::size_t>(n);
        }
        return {};
    }

    // One call moves the whole run (the kernel pins and copies it in chunks through its
    // own map); a partial transfer stops at a page the kernel could not reach, and the
    // next call either continues or fails naming that address.
    Result<void> read_vm(const GuestRegion& g, std::uint32_t region, std::uint64_t first, std::uint32_t count,
                         std::uint64_t offset, std::byte* dst, std::size_t len) const {
        auto* src = static_cast<std::byte*>(g.host) + offset;
        std::size_t done = 0;
        while (done < len) {
            iovec local{dst + done, len - done};
            iovec remote{src + done, len - done};
            const ssize_t n = ::process_vm_readv(pid_, &local, 1, &remote, 1, 0);
            if (n < 0) {
                const int e = errno;
                if (e == EINTR) continue;
                return sys_error(fmt::format("process_vm_readv of region {} '{}' pages {}..{} at {} ({} of {} bytes "
                                             "read){}",
                                             region, g.name, first, first + count - 1,
                                             static_cast<const void*>(src + done), done, len,
                                             e == EPERM || e == ENOSYS
                                                 ? "; reading own memory is refused here (seccomp?): give the "
                                                   "source a read_pages function"
                                                 : ""),
                                 e);
            }
            if (n == 0)
                return sys_error(fmt::format("process_vm_readv of region {} '{}' pages {}..{} at {}: no progress "
                                             "({} of {} bytes read)",
                                             region, g.name, first, first + count - 1,
                                             static_cast<const void*>(src + done), done, len),
                                 EFAULT);
            done += static_cast<std::size_t>(n);
        }
        return {};
    }

    std::vector<GuestRegion> regions_;
    std::vector<Method> methods_;
    PageReadFn vmm_;
    pid_t pid_;
};

}  // namespace

Result<std::unique_ptr<PageReader>> make_page_reader(std::span<const GuestRegion> regions, PageReadFn vmm_reader) {
    auto reader = std::make_unique<Reader>(regions, std::move(vmm_reader));
    std::size_t biggest = 0;
    for (const auto& r : regions) biggest = std::max(biggest, r.page_size);
    if (biggest == 0) return std::unique_ptr<PageReader>(std::move(reader));
    // One page, read once per region: a cold page costs a fault here, but only one.
    std::unique_ptr<std::byte, decltype(&std::free)> probe(static_cast<std::byte*>(std::aligned_alloc(4096, biggest)),
                                                          &std::free);
    if (!probe) return sys_error(fmt::format("page reader: allocating a {}-byte probe buffer", biggest), ENOMEM);
    for (std::uint32_t i = 0; i < regions.size(); ++i) {
        if (regions[i].page_size == 0 || regions[i].size < regions[i].page_size)
            return logic_error(fmt::format("page reader: region {} '{}' holds no whole page ({} bytes, page size {})",
                                           i, regions[i].name, regions[i].size, regions[i].page_size));
        if (auto r = reader->read(i, 0, 1, probe.get()); !r)
            return std::unexpected(r.error().wrap(fmt::format("page reader: {} cannot read region {} '{}'",
                                                              to_string(reader->method(i)), i, regions[i].name)));
    }
    return std::unique_ptr<PageReader>(std::move(reader));
}

}  // namespace lazymig::source
