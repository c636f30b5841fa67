// CRC32C (Castagnoli), the checksum of every frame.
//
// Pages are checksummed one by one and the page CRCs are folded into the frame's
// checksum (see protocol.hpp). Four pages are hashed at once so the SSE4.2 crc32
// instruction's 3-cycle latency is hidden: ~4x the single-stream rate, which matters
// because the checksum runs on both ends of a ~4 GB/s stream on a 2-core machine.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lazymig {

// CRC32C of `len` bytes, continuing from `crc` (0 to start).
[[nodiscard]] std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t len) noexcept;

// out[i] = crc32c(0, pages[i], page_size) for each of `n` pages; page_size % 8 == 0.
void crc32c_pages(const std::byte* const* pages, std::size_t n, std::size_t page_size,
                  std::uint32_t* out) noexcept;

// True when the CPU has the crc32 instruction (the table fallback is ~10x slower).
[[nodiscard]] bool crc32c_hardware() noexcept;

}  // namespace lazymig
