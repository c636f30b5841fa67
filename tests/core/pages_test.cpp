// PAGES frames: the head (header, fixed meta, zero bitmap), its checksum, its length rule.
#include <doctest/doctest.h>

#include <array>
#include <vector>

#include <fmt/format.h>

#include "tests/core/frame_util.hpp"

using namespace core_test;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kHeadMax = proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8;

}  // namespace

TEST_CASE("pages/head-roundtrip-with-zero-bitmap") {
    proto::PagesMeta meta;
    meta.region = 2;
    meta.count = 10;
    meta.first = 0x1'2345'6789ull;
    for (std::uint32_t z : {1u, 4u, 9u}) meta.set_zero(z);
    REQUIRE(meta.nonzero_pages() == 7);
    REQUIRE(meta.bitmap_bytes() == 2);
    const std::vector<std::uint32_t> crcs = {11, 22, 33, 44, 55, 66, 0xdeadbeef};

    std::array<std::byte, kHeadMax> out{};
    const std::size_t n = proto::encode_pages_head(out.data(), meta, kPage, crcs);
    CHECK(n == proto::kHeaderSize + proto::kPagesMetaFixed + 2);

    const auto head = std::span<const std::byte, proto::kHeaderSize>(out.data(), proto::kHeaderSize);
    auto h = proto::parse_header(head, "bulk channel");
    REQUIRE_MESSAGE(h.has_value(), err_of(h));
    CHECK(h->type == proto::Type::pages);
    CHECK(h->length == proto::kPagesMetaFixed + 2 + 7 * kPage);

    auto fixed = proto::decode_pages_fixed(
        std::span<const std::byte, proto::kPagesMetaFixed>(out.data() + proto::kHeaderSize, proto::kPagesMetaFixed),
        "bulk channel");
    REQUIRE_MESSAGE(fixed.has_value(), err_of(fixed));
    CHECK(fixed->region == 2);
    CHECK(fixed->count == 10);
    CHECK(fixed->first == 0x1'2345'6789ull);
    std::memcpy(fixed->zero.data(), out.data() + proto::kHeaderSize + proto::kPagesMetaFixed, fixed->bitmap_bytes());
    for (std::uint32_t i = 0; i < 10; ++i) {
        CAPTURE(i);
        CHECK(fixed->is_zero(i) == (i == 1 || i == 4 || i == 9));
    }
    CHECK(fixed->nonzero_pages() == 7);
    auto len = proto::check_pages_length(*fixed, h->length, kPage, "bulk channel");
    CHECK_MESSAGE(len.has_value(), err_of(len));

    // The checksum: header 0..11, meta and bitmap, then each page's CRC in little-endian.
    const auto meta_bytes = std::span<const std::byte>(out.data() + proto::kHeaderSize, n - proto::kHeaderSize);
    CHECK(proto::pages_checksum(head, meta_bytes, crcs) == h->checksum);
    std::uint32_t manual = lazymig::crc32c(0, out.data(), 12);
    manual = lazymig::crc32c(manual, meta_bytes.data(), meta_bytes.size());
    for (std::uint32_t c : crcs) manual = lazymig::crc32c(manual, &c, 4);
    CHECK(manual == h->checksum);
    // A different page CRC list gives a different frame checksum.
    auto other = crcs;
    other[6] ^= 1;
    CHECK(proto::pages_checksum(head, meta_bytes, other) != h->checksum);
}

TEST_CASE("pages/all-zero-frame-carries-no-data") {
    proto::PagesMeta meta;
    meta.count = proto::kMaxPagesPerFrame;
    for (std::uint32_t i = 0; i < meta.count; ++i) meta.set_zero(i);
    CHECK(meta.nonzero_pages() == 0);
    std::array<std::byte, kHeadMax> out{};
    const std::size_t n = proto::encode_pages_head(out.data(), meta, kPage, {});
    CHECK(n == kHeadMax);
    auto h = proto::parse_header(std::span<const std::byte, proto::kHeaderSize>(out.data(), proto::kHeaderSize), "b");
    REQUIRE_MESSAGE(h.has_value(), err_of(h));
    CHECK(h->length == proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8);
    CHECK(proto::check_pages_length(meta, h->length, kPage, "b").has_value());
}

TEST_CASE("pages/rejects-page-count-out-of-range") {
    auto fixed = [](std::uint32_t count) {
        std::array<std::byte, proto::kPagesMetaFixed> raw{};
        put_le<std::uint32_t>(raw.data() + 4, count);
        return err_of(proto::decode_pages_fixed(raw, "bulk channel"));
    };
    CHECK(fixed(0) == "bulk channel: PAGES frame with 0 pages (expected 1 to 1024)");
    CHECK(fixed(1025) == "bulk channel: PAGES frame with 1025 pages (expected 1 to 1024)");
    CHECK(fixed(1024) == "(no error)");
}

TEST_CASE("pages/check-length-mismatch") {
    proto::PagesMeta meta;
    meta.count = 4;
    meta.set_zero(0);
    const std::uint32_t right = proto::kPagesMetaFixed + 1 + 3 * kPage;
    CHECK(proto::check_pages_length(meta, right, kPage, "bulk channel").has_value());
    CHECK(err_of(proto::check_pages_length(meta, right + kPage, kPage, "bulk channel")) ==
          fmt::format("bulk channel: PAGES frame length {} does not match 4 pages (3 non-zero) of 4096 bytes "
                      "(expected {})", right + kPage, right));
    CHECK(err_of(proto::check_pages_length(meta, right - 1, kPage, "bulk channel")) ==
          fmt::format("bulk channel: PAGES frame length {} does not match 4 pages (3 non-zero) of 4096 bytes "
                      "(expected {})", right - 1, right));
}

// Bitmap bits past `count` are padding: a frame that sets them is refused, and they
// never count as zero pages (once they did, and a frame one page short of data passed).
TEST_CASE("pages/rejects-bitmap-padding-bits") {
    proto::PagesMeta meta;
    meta.count = 10;  // bitmap bytes 0..1; bits 10..15 of byte 1 are padding
    meta.set_zero(12);
    CHECK(meta.nonzero_pages() == 10);
    const std::uint32_t ten = proto::kPagesMetaFixed + 2 + 10 * kPage;
    for (std::uint32_t length : {ten, ten - std::uint32_t(kPage)}) {
        CAPTURE(length);
        CHECK(err_of(proto::check_pages_length(meta, length, kPage, "bulk channel")) ==
              "bulk channel: PAGES frame for 10 pages sets zero-bitmap padding bits (0x10 in its last bitmap byte)");
    }
    meta.zero[1] = 0x02;  // bit 9: page 9 is zero, no padding
    CHECK(proto::check_pages_length(meta, ten - kPage, kPage, "bulk channel").has_value());
}
