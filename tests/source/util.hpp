// tests/source/util.hpp — guest memory for a test, socketpairs, and a PAGES decoder
// that verifies each frame the way a destination must (header, length, checksum).
#pragma once

#include <doctest/doctest.h>
#include <linux/memfd.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "src/crc32c.hpp"
#include "src/net/channel.hpp"
#include "src/net/socket.hpp"
#include "src/protocol.hpp"

namespace source_test {

namespace proto = lazymig::proto;
using lazymig::Result;

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string("(no error)") : r.error().message();
}

// Guest RAM for a test: anonymous (populated) or a memfd/hugetlbfs file mapped shared.
class TestMemory {
public:
    static Result<TestMemory> create(std::string name, std::size_t size, lazymig::Backing backing) {
        TestMemory m;
        m.r_ = lazymig::GuestRegion{.name = name, .host = nullptr, .size = size, .page_size = 4096,
                                    .backing = backing, .fd = -1, .fd_offset = 0};
        if (backing == lazymig::Backing::anon) {
            void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
            if (p == MAP_FAILED) return lazymig::sys_error("mmap anon");
            m.r_.host = p;
            return m;
        }
        const bool huge = backing == lazymig::Backing::hugetlbfs;
        if (huge) m.r_.page_size = 2u << 20;
        m.r_.fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
        if (m.r_.fd < 0) return lazymig::sys_error("memfd_create");
        if (::ftruncate(m.r_.fd, off_t(size)) != 0) return lazymig::sys_error("ftruncate");
        if (huge && ::fallocate(m.r_.fd, 0, 0, off_t(size)) != 0) return lazymig::sys_error("fallocate huge pages");
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, m.r_.fd, 0);
        if (p == MAP_FAILED) return lazymig::sys_error("mmap memfd");
        m.r_.host = p;
        return m;
    }
    TestMemory() = default;
    TestMemory(TestMemory&& o) noexcept : r_(std::exchange(o.r_, {})) {}
    TestMemory& operator=(TestMemory&& o) noexcept {
        std::swap(r_, o.r_);
        return *this;
    }
    ~TestMemory() {
        if (r_.host) ::munmap(r_.host, r_.size);
        if (r_.fd >= 0) ::close(r_.fd);
    }
    [[nodiscard]] const lazymig::GuestRegion& region() const { return r_; }
    [[nodiscard]] std::byte* data() const { return static_cast<std::byte*>(r_.host); }

private:
    lazymig::GuestRegion r_{};
};

// hugetlbfs guest RAM for a test registered on its own (it exits 77, skip, when no huge
// pages can be had): raises vm.nr_hugepages by `pages`, maps `size` bytes; the destructor
// unmaps, then puts the count back.
class HugeTestMemory {
public:
    HugeTestMemory(const char* name, std::size_t size, long pages) {
        std::ifstream(kNr) >> before_;
        if (before_ < 0) {
            std::puts("skip: no hugetlbfs support");
            std::exit(77);
        }
        { std::ofstream(kNr) << before_ + pages; }
        auto m = TestMemory::create(name, size, lazymig::Backing::hugetlbfs);
        if (!m) {
            { std::ofstream(kNr) << before_; }
            std::printf("skip: %s\n", m.error().message().c_str());
            std::exit(77);
        }
        mem_ = std::move(*m);
    }
    ~HugeTestMemory() {
        mem_ = TestMemory();
        std::ofstream(kNr) << before_;
    }
    HugeTestMemory(const HugeTestMemory&) = delete;
    HugeTestMemory& operator=(const HugeTestMemory&) = delete;
    const TestMemory* operator->() const { return &mem_; }

private:
    static constexpr const char* kNr = "/proc/sys/vm/nr_hugepages";
    long before_ = -1;
    TestMemory mem_;
};

// Both ends of a stream socketpair with large buffers.
inline std::pair<int, int> socket_pair() {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    const int big = 4 << 20;
    for (int fd : sv) {
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    }
    return {sv[0], sv[1]};
}

// One received, verified PAGES frame (or another frame's type).
struct Received {
    proto::Type type = proto::Type::invalid;
    proto::PagesMeta meta;
    std::vector<std::byte> data;  // non-zero pages, in order
    std::vector<std::byte> payload;
};

// Parses one frame out of `wire` at `*pos`, verifying header, length and checksum the
// way the destination does. Fails the test case on a bad frame.
inline Received decode_frame(std::span<const std::byte> wire, std::size_t* pos, std::size_t page_size) {
    REQUIRE(wire.size() - *pos >= proto::kHeaderSize);
    const auto head = std::span<const std::byte, proto::kHeaderSize>(wire.data() + *pos, proto::kHeaderSize);
    auto h = proto::parse_header(head, "test wire");
    REQUIRE_MESSAGE(h.has_value(), err_of(h));
    REQUIRE(wire.size() - *pos - proto::kHeaderSize >= h->length);
    const auto payload = wire.subspan(*pos + proto::kHeaderSize, h->length);
    *pos += proto::kHeaderSize + h->length;
    Received r;
    r.type = h->type;
    if (h->type != proto::Type::pages) {
        CHECK(proto::frame_checksum(head, payload) == h->checksum);
        r.payload.assign(payload.begin(), payload.end());
        return r;
    }
    auto m = proto::decode_pages_fixed(payload.first<proto::kPagesMetaFixed>(), "test wire");
    REQUIRE_MESSAGE(m.has_value(), err_of(m));
    r.meta = *m;
    std::memcpy(r.meta.zero.data(), payload.data() + proto::kPagesMetaFixed, r.meta.bitmap_bytes());
    auto len = proto::check_pages_length(r.meta, h->length, page_size, "test wire");
    REQUIRE_MESSAGE(len.has_value(), err_of(len));
    const auto data = payload.subspan(r.meta.meta_bytes());
    std::vector<std::uint32_t> crcs(r.meta.nonzero_pages());
    for (std::size_t i = 0; i < crcs.size(); ++i) crcs[i] = lazymig::crc32c(0, data.data() + i * page_size, page_size);
    CHECK_MESSAGE(proto::pages_checksum(head, payload.first(r.meta.meta_bytes()), crcs) == h->checksum,
                  "frame for pages ", r.meta.first, "+", r.meta.count, " fails its checksum");
    r.data.assign(data.begin(), data.end());
    return r;
}

// Reads whole frames from a socket until PUSH_DONE (included) or end of stream.
inline std::vector<Received> receive_until_done(int fd, std::size_t page_size) {
    std::vector<Received> out;
    std::vector<std::byte> buf;
    auto read_exact = [&](std::size_t n) -> bool {
        buf.resize(n);
        std::size_t got = 0;
        while (got < n) {
            const ssize_t r = ::recv(fd, buf.data() + got, n - got, 0);
            if (r == 0) return false;
            if (r < 0 && errno == EINTR) continue;
            REQUIRE(r > 0);
            got += std::size_t(r);
        }
        return true;
    };
    for (;;) {
        if (!read_exact(proto::kHeaderSize)) return out;
        std::vector<std::byte> frame(buf.begin(), buf.end());
        auto h = proto::parse_header(std::span<const std::byte, proto::kHeaderSize>(frame.data(), proto::kHeaderSize),
                                     "test receiver");
        REQUIRE_MESSAGE(h.has_value(), err_of(h));
        REQUIRE(read_exact(h->length));
        frame.insert(frame.end(), buf.begin(), buf.end());
        std::size_t pos = 0;
        out.push_back(decode_frame(frame, &pos, page_size));
        if (out.back().type == proto::Type::push_done) return out;
    }
}

}  // namespace source_test
