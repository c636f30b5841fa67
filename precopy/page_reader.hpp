// precopy/page_reader.hpp — guest pages into a staging buffer, through the kernel.
//
//   auto reader = make_page_reader(cfg.regions, cfg.read_pages);   // probes each region
//   if (!reader) return fail(reader.error());                      // names the region
//   (*reader)->read(0, first, count, staging);                     // count*page_size bytes
//
// Why a copy at all: on this machine (FLOORS.md) a user mapping — or the kernel through
// a user address, as send(2) from guest RAM does — pays a shadow fault per page the
// first time it reaches it (1.6 GB/s). pread(2) of the backing file and
// process_vm_readv(2) reach the pages through the kernel's own map instead (7.7 and 12
// GB/s into a reused buffer). What is then checksummed and sent is that snapshot, so a
// guest that keeps running (pre-copy) cannot make a frame disagree with its checksum.
//
// Methods, fixed per region at creation (a failing method is an error, never a
// fallback to another):
//   file-backed (memfd, hugetlbfs: fd >= 0)  pread(fd, fd_offset + first*page_size)
//   anonymous (no fd)                        process_vm_readv(getpid(), host + ...)
//   SourceConfig::read_pages set             the VMM's reader, for every region
//
// Threads: read() is safe to call concurrently from several threads, each with its own
// destination buffer (the sender threads and the serve thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "lazymig/lazymig.hpp"

namespace lazymig::source {

class PageReader {
public:
    virtual ~PageReader() = default;
    // Reads pages [first, first+count) of `region` into dst (count*page_size bytes).
    // Safe to call concurrently with distinct dst. Errors name the region, the pages and
    // the call; a range outside the region is refused (code 0) before any syscall.
    [[nodiscard]] virtual Result<void> read(std::uint32_t region, std::uint64_t first, std::uint32_t count,
                                            std::byte* dst) = 0;
};

// Chooses the method for every region and reads its first page once, so a method that
// cannot work here (seccomp refusing process_vm_readv, a closed fd, a VMM reader that
// fails) is reported now, naming the region, not in the middle of a migration.
// `vmm_reader` may be empty. The reader keeps its own copy of the region table.
[[nodiscard]] Result<std::unique_ptr<PageReader>> make_page_reader(std::span<const GuestRegion> regions,
                                                                   PageReadFn vmm_reader);

}  // namespace lazymig::source
