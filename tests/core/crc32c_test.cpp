// CRC32C against published vectors; the four-at-a-time page hash against the plain one.
#include <doctest/doctest.h>
#include <sys/mman.h>

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

TEST_CASE("crc32c/hardware-is-reported") {
    // x86-64 machines this runs on have SSE4.2; the table fallback is only for others.
    MESSAGE("crc32c_hardware() = ", lazymig::crc32c_hardware());
    CHECK(crc32c(0, "a", 1) == 0xC1D04330u);
}
