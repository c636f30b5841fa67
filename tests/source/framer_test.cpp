// PageFramer: frames are built from a snapshot in the staging buffer, so a guest that
// keeps writing cannot make a frame disagree with its checksum.
#include <doctest/doctest.h>

#include <atomic>
#include <set>
#include <thread>

#include "precopy/source.hpp"
#include "tests/source/util.hpp"

using namespace source_test;
using lazymig::Backing;
using lazymig::GuestRegion;
using lazymig::source::make_page_reader;
using lazymig::source::PageFramer;

namespace {

constexpr std::size_t kPage = 4096, kWords = kPage / 8;
constexpr std::uint64_t kPages = 1024, kDataPages = 960;  // the last 64 stay zero

// A writer's word: which page and word it belongs to, and the version of the write.
// A page in a snapshot may mix versions (a writer was inside it while it was read);
// it may never hold a word that belongs to another page or word.
std::uint64_t word(std::uint64_t page, std::uint64_t w, std::uint64_t version) {
    return page << 48 | w << 32 | version;
}

void write_page(std::byte* base, std::uint64_t page, std::uint64_t version) {
    auto* w = reinterpret_cast<std::uint64_t*>(base + page * kPage);
    for (std::size_t i = 0; i < kWords; ++i) std::atomic_ref(w[i]).store(word(page, i, version), std::memory_order_relaxed);
}

void run_snapshot_test(Backing backing) {
    auto mem = TestMemory::create("ram0", kPages * kPage, backing);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    for (std::uint64_t p = 0; p < kDataPages; ++p) write_page(mem->data(), p, 1);
    const GuestRegion g = mem->region();
    auto reader = make_page_reader(std::span(&g, 1), {});
    REQUIRE_MESSAGE(reader.has_value(), err_of(reader));
    auto framer = PageFramer::create(std::span(&g, 1), **reader);
    REQUIRE_MESSAGE(framer.has_value(), err_of(framer));

    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> version{1}, writes{0};
    std::vector<std::thread> writers;
    for (int t = 0; t < 2; ++t)
        writers.emplace_back([&, t] {
            std::uint64_t page = t * 397;
            while (!stop.load(std::memory_order_relaxed)) {
                page = (page + 131) % kDataPages;
                write_page(mem->data(), page, version.fetch_add(1, std::memory_order_relaxed) + 1);
                writes.fetch_add(1, std::memory_order_relaxed);
            }
        });

    std::uint64_t frames = 0, torn = 0, changed = 0;
    for (int round = 0; round < 12; ++round) {
        for (std::uint64_t first = 0; first < kPages; first += 256) {
            auto f = (*framer)->build(0, first, 256);
            REQUIRE_MESSAGE(f.has_value(), err_of(f));
            // "Send" the frame: gather its bytes as the kernel would, after the checksum
            // was taken. The writers keep going meanwhile.
            std::vector<std::byte> wire;
            for (const iovec& v : f->iov)
                wire.insert(wire.end(), static_cast<std::byte*>(v.iov_base),
                            static_cast<std::byte*>(v.iov_base) + v.iov_len);
            CHECK(wire.size() == f->bytes);
            std::size_t pos = 0;
            Received r = decode_frame(wire, &pos, kPage);
            REQUIRE(r.type == proto::Type::pages);
            CHECK(r.meta.first == first);
            CHECK(r.meta.count == 256);
            ++frames;
            std::size_t data_index = 0;
            for (std::uint32_t i = 0; i < 256; ++i) {
                const std::uint64_t page = first + i;
                if (page >= kDataPages) {
                    CHECK_MESSAGE(r.meta.is_zero(i), "page ", page, " is all zeroes but was sent as data");
                    continue;
                }
                REQUIRE_MESSAGE(!r.meta.is_zero(i), "page ", page, " holds data but was sent as zero");
                const auto* w = reinterpret_cast<const std::uint64_t*>(r.data.data() + data_index++ * kPage);
                std::set<std::uint64_t> versions;
                for (std::size_t k = 0; k < kWords; ++k) {
                    if ((w[k] >> 32) != (page << 16 | k)) {
                        FAIL("page ", page, " word ", k, " holds ", w[k], ": not this page's data");
                        break;
                    }
                    versions.insert(w[k] & 0xffffffff);
                }
                torn += versions.size() > 1;
                changed += *versions.rbegin() > 1;
            }
        }
    }
    stop = true;
    for (auto& t : writers) t.join();
    MESSAGE(frames, " frames verified; ", writes.load(), " page writes; ", changed,
            " pages seen rewritten; ", torn, " pages torn within themselves (allowed)");
    // The test proves something only if the guest really wrote while frames were built.
    CHECK(writes.load() > 1000);
    CHECK(changed > 0);
}

}  // namespace

TEST_CASE("source/framer-snapshot-holds-its-checksum-under-writers-anon") { run_snapshot_test(Backing::anon); }
TEST_CASE("source/framer-snapshot-holds-its-checksum-under-writers-memfd") { run_snapshot_test(Backing::memfd); }

TEST_CASE("source/framer-zero-pages-and-runs") {
    auto mem = TestMemory::create("ram0", 64 * kPage, Backing::anon);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    // Pages 3, 4 and 10 hold data; the rest are zero.
    for (std::uint64_t p : {3u, 4u, 10u}) write_page(mem->data(), p, 7);
    const GuestRegion g = mem->region();
    auto reader = make_page_reader(std::span(&g, 1), {});
    REQUIRE_MESSAGE(reader.has_value(), err_of(reader));
    auto framer = PageFramer::create(std::span(&g, 1), **reader, 16 * kPage);
    REQUIRE_MESSAGE(framer.has_value(), err_of(framer));
    CHECK((*framer)->max_pages(0) == 16);
    auto f = (*framer)->build(0, 0, 16);
    REQUIRE_MESSAGE(f.has_value(), err_of(f));
    CHECK(f->zero_pages == 13);
    CHECK(f->iov.size() == 3);  // head, pages 3-4 as one run, page 10
    std::vector<std::byte> wire;
    for (const iovec& v : f->iov)
        wire.insert(wire.end(), static_cast<std::byte*>(v.iov_base), static_cast<std::byte*>(v.iov_base) + v.iov_len);
    std::size_t pos = 0;
    Received r = decode_frame(wire, &pos, kPage);
    CHECK(r.meta.nonzero_pages() == 3);
    CHECK(std::memcmp(r.data.data(), mem->data() + 3 * kPage, 2 * kPage) == 0);
    CHECK(std::memcmp(r.data.data() + 2 * kPage, mem->data() + 10 * kPage, kPage) == 0);
    auto too_many = (*framer)->build(0, 0, 17);
    REQUIRE_FALSE(too_many.has_value());
    CHECK(too_many.error().message() == "page framer: 17 pages of region 0 do not fit one frame");
}
