// Placer: runs that straddle zero and non-zero pages, per backing; every byte checked
// through the guest mapping; what reached the kernel counted.
#include <doctest/doctest.h>

#include <vector>

#include "tests/pager/helpers.hpp"

using namespace pager_test;
using lazymig::PageState;
using lazymig::pager::Pager;
using lazymig::pager::ZeroBits;

namespace {

// Zero pages come in runs that straddle chunk and run boundaries: every 5th page, and
// pages 10..16 and 30..33.
bool is_zero_page(std::uint64_t p) { return p % 5 == 1 || (p >= 10 && p < 17) || (p >= 30 && p < 34); }

std::byte content(std::uint64_t page, std::size_t off) {
    return static_cast<std::byte>((page * 131 + off * 7 + (off >> 12)) % 251 + 1);  // never 0
}

// A frame's bitmap and data for pages [first, first+count) (all zero if `zeros`).
struct Frame {
    std::vector<std::uint8_t> bits;
    std::vector<std::byte> data;
    std::uint64_t nonzero = 0;
    Frame(std::uint64_t first, std::uint32_t count, std::size_t ps, bool zeros = false) : bits((count + 7) / 8) {
        for (std::uint32_t i = 0; i < count; ++i) {
            if (zeros || is_zero_page(first + i)) {
                bits[i / 8] |= std::uint8_t(1u << (i % 8));
                continue;
            }
            ++nonzero;
            for (std::size_t o = 0; o < ps; ++o) data.push_back(content(first + i, o));
        }
    }
    [[nodiscard]] ZeroBits zero() const { return ZeroBits{bits}; }
};

// Every byte of every page through the guest mapping; returns the pages that differ.
std::uint64_t wrong_pages(const Guest& g, std::uint64_t pages, bool all_zero) {
    const std::size_t ps = g.region().page_size;
    std::uint64_t bad = 0;
    for (std::uint64_t p = 0; p < pages; ++p) {
        const std::byte* m = g.page(p);
        bool ok = true;
        for (std::size_t o = 0; o < ps && ok; ++o)
            ok = m[o] == (all_zero || is_zero_page(p) ? std::byte{0} : content(p, o));
        bad += !ok;
    }
    return bad;
}

void placer_round_trip(Backing backing, std::uint64_t pages, std::uint32_t first_frame) {
    Guest g(backing, pages);
    const std::size_t ps = g.region().page_size;
    auto pager = Pager::create(std::span(&g.region(), 1), 16);
    REQUIRE_MESSAGE(pager.has_value(), err_of(pager));
    auto& P = **pager;
    const auto& c = P.placer_counters();
    const bool file = backing != Backing::anon;

    Frame f1(0, first_frame, ps);
    auto r = P.place(0, 0, first_frame, f1.zero(), f1.data.data(), false);
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    CHECK(*r == first_frame);
    if (file) {
        // A fresh file: only non-zero pages were written, and each chunk was mapped whole.
        CHECK(c.bytes_written.get() == f1.nonzero * ps);
        CHECK(c.zero_bytes_written.get() == 0);
        CHECK(c.map_calls.get() == (first_frame + lazymig::pager::Placer::kDefaultChunk - 1) /
                                       lazymig::pager::Placer::kDefaultChunk);
    }
    // Present pages are duplicates: nothing written, nothing mapped.
    const auto writes = c.write_calls.get(), maps = c.map_calls.get();
    Frame dup(2, 6, ps);
    auto d = P.place(0, 2, 6, dup.zero(), dup.data.data(), false);
    REQUIRE_MESSAGE(d.has_value(), err_of(d));
    CHECK(*d == 0);
    CHECK(c.write_calls.get() == writes);
    CHECK(c.map_calls.get() == maps);
    CHECK(P.stats().duplicate.get() == 6);

    Frame f2(first_frame, static_cast<std::uint32_t>(pages - first_frame), ps);
    r = P.place(0, first_frame, static_cast<std::uint32_t>(pages - first_frame), f2.zero(), f2.data.data(), true);
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    CHECK(P.complete());
    CHECK(wrong_pages(g, pages, false) == 0);
    if (file) CHECK(c.zero_bytes_written.get() == 0);

    // Stale: every page back to MISSING; the file pages keep their bytes, so zeros
    // arriving now must be written.
    auto back = P.make_missing(0, 0, pages);
    REQUIRE_MESSAGE(back.has_value(), err_of(back));
    CHECK(*back == pages);
    CHECK(P.present_pages() == 0);
    CHECK(P.regions()[0].state.get(3) == PageState::missing);
    Frame zeros(0, static_cast<std::uint32_t>(pages), ps, true);
    r = P.place(0, 0, static_cast<std::uint32_t>(pages), zeros.zero(), nullptr, false);
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    CHECK(*r == pages);
    if (file) CHECK(c.zero_bytes_written.get() == pages * ps);
    CHECK(wrong_pages(g, pages, true) == 0);
}

}  // namespace

TEST_CASE("pager/placer-anon") { placer_round_trip(Backing::anon, 150, 100); }

TEST_CASE("pager/placer-memfd") { placer_round_trip(Backing::memfd, 150, 100); }

TEST_CASE("pager/placer-hugetlbfs") {
    HugePages hp(40);
    if (!hp.ok()) {
        WARN_MESSAGE(false, "skip pager/placer-hugetlbfs: ", hp.why());
        return;
    }
    placer_round_trip(Backing::hugetlbfs, 40, 23);
}

// STAGED: bytes in the file, not mapped; the map step makes them present; a newer copy
// overwrites a staged page.
TEST_CASE("pager/staged-pages-map-without-network") {
    constexpr std::uint64_t kPages = 32;
    Guest g(Backing::memfd, kPages);
    auto pager = Pager::create(std::span(&g.region(), 1), 16);
    REQUIRE_MESSAGE(pager.has_value(), err_of(pager));
    auto& P = **pager;
    Frame f(0, kPages, 4096);
    auto s = P.stage(0, 0, kPages, f.zero(), f.data.data());
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    CHECK(*s == kPages);
    CHECK(P.present_pages() == 0);
    CHECK(P.regions()[0].state.get(5) == PageState::staged);
    CHECK(P.placer_counters().map_calls.get() == 0);
    // Pages 0..3 get a newer copy: all zero now, written over the staged bytes.
    Frame newer(0, 4, 4096, true);
    auto n = P.place(0, 0, 4, newer.zero(), nullptr, true);
    REQUIRE_MESSAGE(n.has_value(), err_of(n));
    CHECK(*n == 4);
    CHECK(P.placer_counters().zero_bytes_written.get() == 4 * 4096);
    auto m = P.map_staged(0, 0, kPages);
    REQUIRE_MESSAGE(m.has_value(), err_of(m));
    CHECK(*m == kPages - 4);
    CHECK(P.complete());
    for (std::uint64_t p = 0; p < kPages; ++p) {
        const bool zero = p < 4 || is_zero_page(p);
        bool ok = true;
        for (std::size_t o = 0; o < 4096 && ok; ++o) ok = g.page(p)[o] == (zero ? std::byte{0} : content(p, o));
        CHECK_MESSAGE(ok, "page ", p);
    }
    // Anonymous memory cannot stage.
    Guest a(Backing::anon, 4);
    auto pa = Pager::create(std::span(&a.region(), 1), 16);
    REQUIRE_MESSAGE(pa.has_value(), err_of(pa));
    Frame fa(0, 4, 4096);
    auto sa = (*pa)->stage(0, 0, 4, fa.zero(), fa.data.data());
    REQUIRE_FALSE(sa.has_value());
    CHECK(sa.error().message().find("anonymous") != std::string::npos);
}

// The RDMA path's placement: the caller claims pages, its READ puts their bytes in place
// (the file's own pages; a staging buffer for anonymous memory), then map_claimed maps
// them. Simulated here with pwrite and a buffer; every byte checked through the guest.
namespace {
void map_claimed_round_trip(Backing backing) {
    constexpr std::uint64_t kPages = 40;
    Guest g(backing, kPages);
    const std::size_t ps = g.region().page_size;
    auto pager = Pager::create(std::span(&g.region(), 1), 16);
    REQUIRE_MESSAGE(pager.has_value(), err_of(pager));
    auto& P = **pager;
    for (std::uint64_t p = 0; p < kPages; ++p) REQUIRE(P.claim(0, p));
    CHECK(!P.claim(0, 5));  // claimed: nobody else may write it
    Frame f(0, kPages, ps);
    std::vector<std::byte> staged(kPages * ps);
    const std::byte* next = f.data.data();
    for (std::uint64_t p = 0; p < kPages; ++p) {
        if (is_zero_page(p)) continue;
        std::memcpy(staged.data() + p * ps, next, ps);
        if (backing != Backing::anon)
            REQUIRE(::pwrite(g.region().fd, next, ps, static_cast<off_t>(p * ps)) == static_cast<ssize_t>(ps));
        next += ps;
    }
    auto n = P.map_claimed(0, 0, kPages, f.zero(), backing == Backing::anon ? staged.data() : nullptr, true);
    REQUIRE_MESSAGE(n.has_value(), err_of(n));
    CHECK(*n == kPages);
    CHECK(P.present_pages() == kPages);
    CHECK(P.complete());
    for (std::uint64_t p = 0; p < kPages; ++p) CHECK(P.regions()[0].state.get(p) == PageState::present);
    CHECK(!P.claim(0, 3));  // present: the guest may have written it since
    CHECK(wrong_pages(g, kPages, false) == 0);
}

}  // namespace

TEST_CASE("pager/map-claimed-anon") { map_claimed_round_trip(Backing::anon); }
TEST_CASE("pager/map-claimed-memfd") { map_claimed_round_trip(Backing::memfd); }
