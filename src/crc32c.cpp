#include "src/crc32c.hpp"

#include <nmmintrin.h>

#include <array>
#include <cstring>

namespace lazymig {
namespace {

constexpr std::array<std::uint32_t, 256> make_table() {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
        std::uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        t[i] = c;
    }
    return t;
}
constexpr auto kTable = make_table();

std::uint32_t crc_soft(std::uint32_t crc, const unsigned char* p, std::size_t len) noexcept {
    while (len--) crc = kTable[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

__attribute__((target("sse4.2"))) std::uint32_t crc_hw(std::uint32_t crc, const unsigned char* p,
                                                       std::size_t len) noexcept {
    std::uint64_t c = crc;
    for (; len >= 8; len -= 8, p += 8) {
        std::uint64_t v;
        std::memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
    }
    std::uint32_t c32 = static_cast<std::uint32_t>(c);
    for (; len; --len) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

// Four independent dependency chains: one crc32 per cycle instead of one per three.
__attribute__((target("sse4.2"))) void crc_hw4(const std::byte* const* pages, std::size_t page_size,
                                               std::uint32_t* out) noexcept {
    std::uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu, c3 = 0xffffffffu;
    const auto* p0 = reinterpret_cast<const unsigned char*>(pages[0]);
    const auto* p1 = reinterpret_cast<const unsigned char*>(pages[1]);
    const auto* p2 = reinterpret_cast<const unsigned char*>(pages[2]);
    const auto* p3 = reinterpret_cast<const unsigned char*>(pages[3]);
    for (std::size_t off = 0; off < page_size; off += 8) {
        std::uint64_t v0, v1, v2, v3;
        std::memcpy(&v0, p0 + off, 8);
        std::memcpy(&v1, p1 + off, 8);
        std::memcpy(&v2, p2 + off, 8);
        std::memcpy(&v3, p3 + off, 8);
        c0 = _mm_crc32_u64(c0, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
        c3 = _mm_crc32_u64(c3, v3);
    }
    out[0] = ~static_cast<std::uint32_t>(c0);
    out[1] = ~static_cast<std::uint32_t>(c1);
    out[2] = ~static_cast<std::uint32_t>(c2);
    out[3] = ~static_cast<std::uint32_t>(c3);
}

const bool kHardware = __builtin_cpu_supports("sse4.2");

}  // namespace

bool crc32c_hardware() noexcept { return kHardware; }

std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t len) noexcept {
    const auto* p = static_cast<const unsigned char*>(data);
    crc = ~crc;
    crc = kHardware ? crc_hw(crc, p, len) : crc_soft(crc, p, len);
    return ~crc;
}

void crc32c_pages(const std::byte* const* pages, std::size_t n, std::size_t page_size,
                  std::uint32_t* out) noexcept {
    std::size_t i = 0;
    if (kHardware)
        for (; i + 4 <= n; i += 4) crc_hw4(pages + i, page_size, out + i);
    for (; i < n; ++i) out[i] = crc32c(0, pages[i], page_size);
}

}  // namespace lazymig
