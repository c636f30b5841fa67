// tests/pager/helpers.hpp — guest memory of each backing, a Channel over a socket, and a
// peer end that reads page requests, for the pager tests. Waits are failure detectors.
#pragma once

#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/memfd.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "pager/pager.hpp"
#include "src/net/channel.hpp"
#include "src/protocol.hpp"

namespace pager_test {

using lazymig::Backing;
using lazymig::GuestRegion;
inline constexpr int kTimeoutMs = 20'000;

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string("(no error)") : r.error().message();
}

// Huge pages reserved for a test and given back; ok() false (with why()) when impossible.
class HugePages {
public:
    explicit HugePages(long need) {
        before_ = read("/proc/sys/vm/nr_hugepages");
        if (before_ < 0) {
            why_ = "no hugetlbfs support";
            return;
        }
        if (read(kFree) < need) write("/proc/sys/vm/nr_hugepages", before_ + need);
        if (read(kFree) < need) {
            why_ = "cannot reserve " + std::to_string(need) + " free 2 MiB huge pages (need root; " +
                   std::to_string(read(kFree)) + " free)";
            return;
        }
        ok_ = true;
    }
    ~HugePages() {
        if (before_ >= 0) write("/proc/sys/vm/nr_hugepages", before_);
    }
    [[nodiscard]] bool ok() const { return ok_; }
    [[nodiscard]] const std::string& why() const { return why_; }

private:
    static constexpr const char* kFree = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    static long read(const char* p) {
        std::ifstream f(p);
        long v = -1;
        f >> v;
        return v;
    }
    static void write(const char* p, long v) {
        std::ofstream f(p);
        f << v;
    }
    long before_ = -1;
    bool ok_ = false;
    std::string why_;
};

// Guest memory as a VMM would hand it over; a file's pages hold 0xAA "left over from the
// VMM" so a test sees that the pager made the file fresh.
class Guest {
public:
    Guest(Backing b, std::size_t pages) {
        const std::size_t ps = b == Backing::hugetlbfs ? (2u << 20) : 4096;
        region_ = GuestRegion{.name = "ram0", .host = nullptr, .size = pages * ps, .page_size = ps, .backing = b,
                              .fd = -1, .fd_offset = 0};
        if (b == Backing::anon) {
            region_.host = ::mmap(nullptr, region_.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            REQUIRE(region_.host != MAP_FAILED);
            ::madvise(region_.host, region_.size, MADV_NOHUGEPAGE);
            return;
        }
        region_.fd = ::memfd_create("pager-test", MFD_CLOEXEC | (b == Backing::hugetlbfs ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
        REQUIRE(region_.fd >= 0);
        REQUIRE(::ftruncate(region_.fd, static_cast<off_t>(region_.size)) == 0);
        region_.host = ::mmap(nullptr, region_.size, PROT_READ | PROT_WRITE, MAP_SHARED, region_.fd, 0);
        REQUIRE(region_.host != MAP_FAILED);
        std::memset(region_.host, 0xAA, region_.size);
    }
    ~Guest() {
        if (region_.host) ::munmap(region_.host, region_.size);
        if (region_.fd >= 0) ::close(region_.fd);
    }
    Guest(const Guest&) = delete;
    Guest& operator=(const Guest&) = delete;
    [[nodiscard]] const GuestRegion& region() const { return region_; }
    [[nodiscard]] std::byte* page(std::uint64_t p) const {
        return static_cast<std::byte*>(region_.host) + p * region_.page_size;
    }

private:
    GuestRegion region_;
};

// A Channel over one end of a socketpair; only the sending side the Outbox uses is real.
class SocketChannel final : public lazymig::net::Channel {
public:
    explicit SocketChannel(int fd) : fd_(fd) {}
    const std::string& where() const override { return where_; }
    lazymig::Result<std::size_t> recv_some(void*, std::size_t) override { return unused(); }
    lazymig::Result<void> recv_exact(void*, std::size_t) override { return unused(); }
    lazymig::Result<void> send(std::span<const iovec>) override { return unused(); }
    lazymig::Result<void> send_start(std::span<const iovec>) override { return unused(); }
    lazymig::Result<void> send_finish() override { return unused(); }
    lazymig::Result<void> wait_until(std::chrono::steady_clock::time_point) override { return unused(); }
    lazymig::Result<std::size_t> try_send(std::span<const std::byte> b) override {
        const ssize_t n = ::send(fd_, b.data(), b.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n >= 0) return static_cast<std::size_t>(n);
        if (errno == EAGAIN) return std::size_t{0};
        const int e = errno;
        return lazymig::sys_error("test channel: send", e);
    }
    int poll_fd() const override { return fd_; }
    std::uint64_t bytes_received() const override { return 0; }
    std::uint64_t bytes_sent() const override { return 0; }

private:
    static std::unexpected<lazymig::Error> unused() { return lazymig::logic_error("test channel: not used here"); }
    int fd_;
    std::string where_ = "test urgent channel";
};

// Both ends of a socketpair with small buffers, so a peer that does not read fills it.
struct SocketPair {
    int dst = -1, peer = -1;
    SocketPair() {
        int sv[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        dst = sv[0];
        peer = sv[1];
        const int small = 4096;
        ::setsockopt(dst, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
        ::setsockopt(peer, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    ~SocketPair() {
        ::close(dst);
        ::close(peer);
    }
    // Reads exactly n bytes from the peer end; false after kTimeoutMs without progress.
    bool read_exact(void* out, std::size_t n) const {
        auto* p = static_cast<char*>(out);
        while (n > 0) {
            pollfd f{peer, POLLIN, 0};
            if (::poll(&f, 1, kTimeoutMs) != 1) return false;
            const ssize_t got = ::recv(peer, p, n, 0);
            if (got <= 0) return false;
            p += got;
            n -= static_cast<std::size_t>(got);
        }
        return true;
    }
    // The next PAGE_REQUEST the destination sent; nullopt on timeout or a bad frame.
    std::optional<lazymig::proto::PageRequest> next_request() const {
        std::array<std::byte, lazymig::proto::kHeaderSize> raw;
        if (!read_exact(raw.data(), raw.size())) return std::nullopt;
        auto h = lazymig::proto::parse_header(raw, "test peer");
        if (!h || h->type != lazymig::proto::Type::page_request) return std::nullopt;
        std::vector<std::byte> payload(h->length);
        if (!read_exact(payload.data(), payload.size())) return std::nullopt;
        auto r = lazymig::proto::decode_page_request(payload);
        if (!r) return std::nullopt;
        return *r;
    }
};

}  // namespace pager_test
