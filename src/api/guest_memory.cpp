// GuestMemory: guest RAM for a VMM or a test, in one of the three backings.
#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include "lazymig/lazymig.hpp"
#include "src/errors.hpp"

namespace lazymig {

namespace {
constexpr std::size_t kHugePage = 2u << 20;

std::string hugepage_hint(std::size_t size) {
    return fmt::format("not enough free 2 MiB huge pages for {} MiB; reserve them with "
                       "`echo N > /proc/sys/vm/nr_hugepages` (N >= {})",
                       size >> 20, size / kHugePage);
}
}  // namespace

Result<GuestMemory> GuestMemory::create(std::string name, std::size_t size, Backing backing,
                                        bool populate) noexcept {
    const std::size_t page = backing == Backing::hugetlbfs ? kHugePage : 4096;
    if (size == 0 || size % page != 0)
        return logic_error(fmt::format("guest memory '{}': size {} is not a positive multiple of "
                                       "the page size {}", name, size, page));
    const int pop = populate ? MAP_POPULATE : 0;
    GuestMemory mem;
    mem.region_ = GuestRegion{.name = name, .host = nullptr, .size = size, .page_size = page,
                              .backing = backing, .fd = -1, .fd_offset = 0};
    void* addr = MAP_FAILED;
    switch (backing) {
    case Backing::anon:
        addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | pop, -1, 0);
        if (addr == MAP_FAILED) return LZ_SYS_ERROR("mmap anonymous guest memory '{}' ({} bytes)", name, size);
        break;
    case Backing::memfd:
    case Backing::hugetlbfs: {
        const unsigned flags = MFD_CLOEXEC | (backing == Backing::hugetlbfs ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
        const int fd = ::memfd_create(("lazymig:" + name).c_str(), flags);
        if (fd < 0) return LZ_SYS_ERROR("memfd_create for guest memory '{}'", name);
        mem.region_.fd = fd;  // owned from here: the destructor closes it
        if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
            return LZ_SYS_ERROR("ftruncate guest memory '{}' to {} bytes", name, size);
        if (backing == Backing::hugetlbfs && ::fallocate(fd, 0, 0, static_cast<off_t>(size)) != 0) {
            const int e = errno;
            return sys_error(fmt::format("guest memory '{}': {}", name, hugepage_hint(size)), e);
        }
        addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | pop, fd, 0);
        if (addr == MAP_FAILED) return LZ_SYS_ERROR("mmap {} guest memory '{}' ({} bytes)", to_string(backing), name, size);
        break;
    }
    case Backing::invalid:
        return logic_error(fmt::format("guest memory '{}': backing is invalid", name));
    }
    mem.region_.host = addr;
    return mem;
}

GuestMemory::GuestMemory(GuestMemory&& o) noexcept : region_(o.region_) {
    o.region_.host = nullptr;
    o.region_.fd = -1;
}

GuestMemory& GuestMemory::operator=(GuestMemory&& o) noexcept {
    if (this != &o) {
        this->~GuestMemory();
        new (this) GuestMemory(std::move(o));
    }
    return *this;
}

GuestMemory::~GuestMemory() {
    if (region_.host) ::munmap(region_.host, region_.size);
    if (region_.fd >= 0) ::close(region_.fd);
    region_.host = nullptr;
    region_.fd = -1;
}

}  // namespace lazymig
