// tests/source/util.hpp — a test-only Channel over a socket, and a PAGES decoder that
// verifies each frame the way a destination must (header, length, checksum).
#pragma once

#include <doctest/doctest.h>
#include <linux/memfd.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "src/crc32c.hpp"
#include "src/net/channel.hpp"
#include "src/protocol.hpp"

namespace source_test {

namespace proto = lazymig::proto;
using lazymig::Result;

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string("(no error)") : r.error().message();
}

// A blocking Channel over one end of a socketpair. Test helper only: send_start() sends
// synchronously (the pipelining contract — bytes untouched until send_finish() — holds
// trivially); the library's channels come from the Transport.
class SocketChannel final : public lazymig::net::Channel {
public:
    explicit SocketChannel(int fd, std::string where = "test channel") : fd_(fd), where_(std::move(where)) {}
    ~SocketChannel() override { ::close(fd_); }
    const std::string& where() const override { return where_; }
    Result<std::size_t> recv_some(void* dst, std::size_t len) override {
        for (;;) {
            const ssize_t n = ::recv(fd_, dst, len, 0);
            if (n >= 0) return std::size_t(n);
            if (errno != EINTR) return lazymig::sys_error(where_ + ": recv");
        }
    }
    Result<void> recv_exact(void* dst, std::size_t len) override {
        auto* p = static_cast<char*>(dst);
        while (len > 0) {
            auto n = recv_some(p, len);
            if (!n) return std::unexpected(n.error());
            if (*n == 0) return lazymig::transport_error(where_ + ": end of stream", ECONNRESET);
            p += *n;
            len -= *n;
        }
        return {};
    }
    Result<void> send(std::span<const iovec> iov) override {
        std::vector<iovec> v(iov.begin(), iov.end());
        std::size_t i = 0;
        while (i < v.size()) {
            msghdr m{};
            m.msg_iov = v.data() + i;
            m.msg_iovlen = std::min<std::size_t>(v.size() - i, 1024);
            ssize_t n = ::sendmsg(fd_, &m, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                return lazymig::sys_error(where_ + ": sendmsg");
            }
            sent_ += std::size_t(n);
            while (n > 0 && i < v.size()) {
                const std::size_t take = std::min<std::size_t>(std::size_t(n), v[i].iov_len);
                v[i].iov_base = static_cast<char*>(v[i].iov_base) + take;
                v[i].iov_len -= take;
                n -= ssize_t(take);
                if (v[i].iov_len == 0) ++i;
            }
            while (i < v.size() && v[i].iov_len == 0) ++i;
        }
        return {};
    }
    Result<void> send_start(std::span<const iovec> iov) override {
        REQUIRE_FALSE(in_flight_);
        in_flight_ = true;
        ++starts_;
        return send(iov);
    }
    Result<void> send_finish() override {
        in_flight_ = false;
        return {};
    }
    Result<void> wait_until(std::chrono::steady_clock::time_point) override { return {}; }
    Result<std::size_t> try_send(std::span<const std::byte> bytes) override {
        const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? Result<std::size_t>(0) : lazymig::sys_error(where_ + ": send");
        return std::size_t(n);
    }
    int poll_fd() const override { return fd_; }
    std::uint64_t bytes_received() const override { return 0; }
    std::uint64_t bytes_sent() const override { return sent_; }
    [[nodiscard]] int fd() const { return fd_; }
    [[nodiscard]] std::uint64_t starts() const { return starts_; }

private:
    int fd_;
    std::string where_;
    bool in_flight_ = false;
    std::uint64_t sent_ = 0, starts_ = 0;
};

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
