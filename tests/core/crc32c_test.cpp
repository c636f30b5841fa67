// CRC32C against published vectors; the four-at-a-time page hash against the plain one.
#include <doctest/doctest.h>
#include <sys/mman.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

#include <cstring>
#include <string_view>
#include <vector>

#include "src/crc32c.hpp"

using lazymig::crc32c;

TEST_CASE("crc32c/known-vectors") {
    constexpr std::string_view digits = "123456789";
    CHECK(crc32c(0, digits.data(), digits.size()) == 0xE3069283u);
    const std::vector<unsigned char> zeros(32, 0), ones(32, 0xff);
    CHECK(crc32c(0, zeros.data(), zeros.size()) == 0x8A9136AAu);
    CHECK(crc32c(0, ones.data(), ones.size()) == 0x62A8AB43u);  // RFC 3720 B.4
    std::vector<unsigned char> inc(32), dec(32);
    for (int i = 0; i < 32; ++i) {
        inc[i] = static_cast<unsigned char>(i);
        dec[i] = static_cast<unsigned char>(31 - i);
    }
    CHECK(crc32c(0, inc.data(), inc.size()) == 0x46DD794Eu);
    CHECK(crc32c(0, dec.data(), dec.size()) == 0x113FDB5Cu);
    CHECK(crc32c(0, nullptr, 0) == 0);
}

TEST_CASE("crc32c/continues-across-calls") {
    constexpr std::string_view text = "the quick brown fox jumps over the lazy dog, twice over";
    const auto whole = crc32c(0, text.data(), text.size());
    for (std::size_t cut = 0; cut <= text.size(); ++cut) {
        CAPTURE(cut);
        CHECK(crc32c(crc32c(0, text.data(), cut), text.data() + cut, text.size() - cut) == whole);
    }
}

TEST_CASE("crc32c/pages-match-one-by-one") {
    for (std::size_t page : {std::size_t(8), std::size_t(64), std::size_t(4096), std::size_t(2) << 20}) {
        constexpr std::size_t kMax = 9;
        std::vector<std::byte> mem(kMax * page);
        std::uint64_t x = 0x9E3779B97F4A7C15ull ^ page;
        for (auto& b : mem) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            b = std::byte{static_cast<unsigned char>(x >> 56)};
        }
        for (std::size_t n = 1; n <= kMax; ++n) {
            CAPTURE(page);
            CAPTURE(n);
            // Pages in a scrambled order, so the batch's inputs are not one contiguous block.
            std::vector<const std::byte*> ptrs(n);
            for (std::size_t i = 0; i < n; ++i) ptrs[i] = mem.data() + ((i * 5 + 3) % kMax) * page;
            std::vector<std::uint32_t> out(n + 1, 0xAAAAAAAAu);
            lazymig::crc32c_pages(ptrs.data(), n, page, out.data());
            for (std::size_t i = 0; i < n; ++i) {
                CAPTURE(i);
                CHECK(out[i] == crc32c(0, ptrs[i], page));
            }
            CHECK(out[n] == 0xAAAAAAAAu);  // nothing written past the n-th result
        }
    }
}

namespace {

// CRC32C bit by bit, straight from the polynomial: the reference both of the library's
// implementations (SSE4.2 crc32 instruction, table) must agree with.
std::uint32_t crc32c_bitwise(std::uint32_t crc, const unsigned char* p, std::size_t len) {
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
    }
    return ~crc;
}

#if defined(__x86_64__)
// What the CPU says it has: CPUID leaf 1, ECX bit 20 is SSE4.2 (the crc32 instruction).
bool cpuid_sse42() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) == 0) return false;
    return (c & bit_SSE4_2) != 0;
}

// The crc32 instruction itself, byte by byte, independent of the library's code.
__attribute__((target("sse4.2"))) std::uint32_t crc32c_instruction(std::uint32_t crc, const unsigned char* p,
                                                                   std::size_t len) {
    crc = ~crc;
    while (len--) crc = _mm_crc32_u8(crc, *p++);
    return ~crc;
}
#endif

}  // namespace

TEST_CASE("crc32c/hardware-matches-cpuid") {
#if defined(__x86_64__)
    CHECK(lazymig::crc32c_hardware() == cpuid_sse42());
#else
    CHECK_FALSE(lazymig::crc32c_hardware());
#endif
}

TEST_CASE("crc32c/implementations-agree") {
    // Random lengths and misalignments: the library (whichever implementation it chose),
    // the bitwise reference and, where the CPU has it, the crc32 instruction byte by byte.
    std::vector<unsigned char> buf(9000);
    std::uint64_t x = 0x243F6A8885A308D3ull;
    for (auto& b : buf) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        b = static_cast<unsigned char>(x >> 56);
    }
    for (int i = 0; i < 300; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        const std::size_t off = (x >> 20) % 64, len = (x >> 40) % (buf.size() - 64);
        const std::uint32_t seed = i % 3 == 0 ? 0 : static_cast<std::uint32_t>(x);
        CAPTURE(off);
        CAPTURE(len);
        const std::uint32_t want = crc32c_bitwise(seed, buf.data() + off, len);
        CHECK(crc32c(seed, buf.data() + off, len) == want);
#if defined(__x86_64__)
        if (cpuid_sse42()) CHECK(crc32c_instruction(seed, buf.data() + off, len) == want);
#endif
    }
    CHECK(crc32c_bitwise(0, reinterpret_cast<const unsigned char*>("123456789"), 9) == 0xE3069283u);
    CHECK(crc32c(0, "a", 1) == 0xC1D04330u);
}
