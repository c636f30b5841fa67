// PageReader: each method reads exactly the pages asked for, and every failure names
// the region, the pages and the call.
#include <doctest/doctest.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include <fmt/format.h>

#include "precopy/page_reader.hpp"
#include "tests/source/util.hpp"

using namespace source_test;
using lazymig::Backing;
using lazymig::GuestRegion;
using lazymig::source::make_page_reader;

namespace {

constexpr std::size_t kPage = 4096;

// Word w of page p: identifies both, so a page read from the wrong place shows.
std::uint64_t word_of(std::uint64_t page, std::size_t w) { return (page << 32) | (w * 0x9e37u) | 1; }

void fill(std::byte* base, std::size_t pages, std::size_t page_size) {
    for (std::size_t p = 0; p < pages; ++p) {
        auto* w = reinterpret_cast<std::uint64_t*>(base + p * page_size);
        for (std::size_t i = 0; i < page_size / 8; ++i) w[i] = word_of(p, i);
    }
}

void check_pages(const std::byte* got, std::uint64_t first, std::uint32_t count, std::size_t page_size) {
    for (std::uint32_t p = 0; p < count; ++p) {
        const auto* w = reinterpret_cast<const std::uint64_t*>(got + std::size_t(p) * page_size);
        for (std::size_t i = 0; i < page_size / 8; ++i)
            if (w[i] != word_of(first + p, i)) {
                FAIL("page ", first + p, " word ", i, " is ", w[i], ", expected ", word_of(first + p, i));
                return;
            }
    }
}

void read_and_check(lazymig::source::PageReader& r, std::uint64_t first, std::uint32_t count,
                    std::size_t page_size = kPage) {
    std::vector<std::byte> buf(count * page_size);
    auto got = r.read(0, first, count, buf.data());
    REQUIRE_MESSAGE(got.has_value(), err_of(got));
    check_pages(buf.data(), first, count, page_size);
}

}  // namespace

TEST_CASE("source/page-reader-anon") {
    auto mem = TestMemory::create("ram0", 1024 * kPage, Backing::anon);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    fill(mem->data(), 1024, kPage);
    const GuestRegion g = mem->region();
    auto r = make_page_reader(std::span(&g, 1), {});
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    read_and_check(**r, 0, 1);
    read_and_check(**r, 5, 256);
    read_and_check(**r, 0, 1024);  // 4 MiB in one call
    read_and_check(**r, 1023, 1);
}

TEST_CASE("source/page-reader-memfd-at-an-offset") {
    // The region maps the second MiB of its file: reads must add fd_offset.
    const int fd = ::memfd_create("lazymig-test", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, 2 << 20) == 0);
    void* host = ::mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 1 << 20);
    REQUIRE(host != MAP_FAILED);
    fill(static_cast<std::byte*>(host), 256, kPage);
    const GuestRegion g{.name = "ram1", .host = host, .size = 1 << 20, .page_size = kPage, .backing = Backing::memfd,
                        .fd = fd, .fd_offset = 1 << 20};
    auto r = make_page_reader(std::span(&g, 1), {});
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    read_and_check(**r, 0, 256);
    read_and_check(**r, 17, 3);
    ::munmap(host, 1 << 20);
    ::close(fd);
}

TEST_CASE("source/page-reader-memfd-guest-memory") {
    auto mem = TestMemory::create("ram0", 512 * kPage, Backing::memfd);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    fill(mem->data(), 512, kPage);
    const GuestRegion g = mem->region();
    auto r = make_page_reader(std::span(&g, 1), {});
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    read_and_check(**r, 0, 512);
}

// Registered as its own meson test: exits 77 (skip) when no huge pages can be had.
TEST_CASE("source/page-reader-hugetlbfs") {
    HugeTestMemory mem("huge0", 4 << 20, 2);
    const std::size_t huge = mem->region().page_size;
    fill(mem->data(), 2, huge);
    const GuestRegion g = mem->region();
    {
        auto r = make_page_reader(std::span(&g, 1), {});
        REQUIRE_MESSAGE(r.has_value(), err_of(r));
        read_and_check(**r, 0, 2, huge);
        read_and_check(**r, 1, 1, huge);
    }
}

TEST_CASE("source/page-reader-vmm") {
    auto mem = TestMemory::create("ram0", 64 * kPage, Backing::anon);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    fill(mem->data(), 64, kPage);
    const GuestRegion g = mem->region();
    std::vector<std::pair<std::uint64_t, std::size_t>> calls;
    lazymig::PageReadFn fn = [&](std::uint32_t region, std::uint64_t offset, std::span<std::byte> dst) -> Result<void> {
        CHECK(region == 0);
        calls.emplace_back(offset, dst.size());
        std::memcpy(dst.data(), mem->data() + offset, dst.size());
        return {};
    };
    auto r = make_page_reader(std::span(&g, 1), fn);
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    REQUIRE(calls.size() == 1);  // the probe: the first page
    CHECK(calls[0] == std::pair<std::uint64_t, std::size_t>(0, kPage));
    read_and_check(**r, 10, 20);
    REQUIRE(calls.size() == 2);
    CHECK(calls[1] == std::pair<std::uint64_t, std::size_t>(10 * kPage, 20 * kPage));

    // A VMM reader that fails: refused at creation, naming the region and the reader.
    lazymig::PageReadFn bad = [](std::uint32_t, std::uint64_t, std::span<std::byte>) -> Result<void> {
        return lazymig::sys_error("kvm: reading guest memory", EIO);
    };
    auto refused = make_page_reader(std::span(&g, 1), bad);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == EIO);
    CHECK(refused.error().message() ==
          "page reader: the VMM's read_pages cannot read region 0 'ram0': the VMM's read_pages for region 0 'ram0' "
          "pages 0..0: kvm: reading guest memory: Input/output error (errno 5)");
}

TEST_CASE("source/page-reader-errors") {
    auto mem = TestMemory::create("ram0", 16 * kPage, Backing::anon);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    const GuestRegion g = mem->region();
    auto r = make_page_reader(std::span(&g, 1), {});
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    std::vector<std::byte> buf(32 * kPage);

    SUBCASE("a region that does not exist") {
        auto e = (*r)->read(1, 0, 1, buf.data());
        REQUIRE_FALSE(e.has_value());
        CHECK(e.error().message() == "page reader: region 1 does not exist (there are 1)");
    }
    SUBCASE("pages past the end") {
        auto e = (*r)->read(0, 10, 7, buf.data());
        REQUIRE_FALSE(e.has_value());
        CHECK(e.error().message() == "page reader: pages 10..16 are outside region 0 'ram0' (16 pages)");
        e = (*r)->read(0, 16, 1, buf.data());
        REQUIRE_FALSE(e.has_value());
        e = (*r)->read(0, 0, 0, buf.data());
        REQUIRE_FALSE(e.has_value());
    }
    SUBCASE("a file descriptor that is not open") {
        const int fd = ::memfd_create("lazymig-test", MFD_CLOEXEC);
        REQUIRE(fd >= 0);
        REQUIRE(::close(fd) == 0);
        const GuestRegion f{.name = "ram9", .host = mem->data(), .size = 16 * kPage, .page_size = kPage,
                            .backing = Backing::memfd, .fd = fd, .fd_offset = 0};
        auto made = make_page_reader(std::span(&f, 1), {});
        REQUIRE_FALSE(made.has_value());
        CHECK(made.error().code == EBADF);
        CHECK(made.error().message() ==
              fmt::format("page reader: pread cannot read region 0 'ram9': pread of region 0 'ram9' pages 0..0: fd {} "
                          "offset 0 (0 of 4096 bytes read): Bad file descriptor (errno 9)",
                          fd));
    }
    SUBCASE("a file shorter than the region") {
        const int fd = ::memfd_create("lazymig-test", MFD_CLOEXEC);
        REQUIRE(fd >= 0);
        REQUIRE(::ftruncate(fd, 2 * kPage) == 0);
        const GuestRegion f{.name = "ram2", .host = mem->data(), .size = 16 * kPage, .page_size = kPage,
                            .backing = Backing::memfd, .fd = fd, .fd_offset = 0};
        auto made = make_page_reader(std::span(&f, 1), {});
        REQUIRE_MESSAGE(made.has_value(), err_of(made));
        auto e = (*made)->read(0, 1, 4, buf.data());
        REQUIRE_FALSE(e.has_value());
        CHECK(e.error().message() ==
              fmt::format("pread of region 0 'ram2' pages 1..4: fd {} ends at offset 8192, inside the region (is the "
                          "file shorter than fd_offset + size?)",
                          fd));
        ::close(fd);
    }
    SUBCASE("anonymous memory that is not mapped: EFAULT names the address") {
        // Pages 8..15 unmapped: a read of 4..11 gets 4 pages, then fails at page 8.
        REQUIRE(::munmap(mem->data() + 8 * kPage, 8 * kPage) == 0);
        auto e = (*r)->read(0, 4, 8, buf.data());
        REQUIRE_FALSE(e.has_value());
        CHECK(e.error().code == EFAULT);
        CHECK(e.error().message() ==
              fmt::format("process_vm_readv of region 0 'ram0' pages 4..11 at {} (16384 of 32768 bytes read): Bad "
                          "address (errno 14)",
                          static_cast<const void*>(mem->data() + 8 * kPage)));
        // Give GuestMemory a whole mapping back to unmap.
        REQUIRE(::mmap(mem->data() + 8 * kPage, 8 * kPage, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED);
    }
}
