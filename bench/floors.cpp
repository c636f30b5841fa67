// The machine's floors: raw loopback TCP, local userfaultfd faults, memcpy.
#include "bench/floors.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <thread>

#include "uffd/uffd.hpp"

namespace bench {
namespace {

[[noreturn]] void die(const char* what) {
    std::perror(what);
    std::_Exit(2);
}

void send_all(int fd, const void* buf, std::size_t len) {
    const char* p = static_cast<const char*>(buf);
    while (len > 0) {
        const ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("bench floor: send");
        p += n;
        len -= static_cast<std::size_t>(n);
    }
}

// false on a clean end of stream before the first byte.
bool recv_all(int fd, void* buf, std::size_t len) {
    char* p = static_cast<char*>(buf);
    std::size_t got = 0;
    while (got < len) {
        const ssize_t n = ::recv(fd, p + got, len - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0 && got == 0) return false;
        if (n <= 0) die("bench floor: recv");
        got += static_cast<std::size_t>(n);
    }
    return true;
}

void set_nodelay(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

pid_t fork_or_die() {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) die("bench floor: fork");
    return pid;
}

void reap(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
}

Fields latency_fields(const std::string& prefix, std::vector<std::uint32_t>& ns) {
    const Percentiles p = summarize(ns);
    Fields f;
    f.set(prefix + "_p50_us", p.p50_us)
        .set(prefix + "_p99_us", p.p99_us)
        .set(prefix + "_p999_us", p.p999_us)
        .set(prefix + "_mean_us", p.mean_us)
        .set(prefix + "_count", p.count);
    return f;
}

// Touches pages of `base` in random order while a handler thread resolves each fault
// with `resolve(page_address)`. Returns the first-touch latencies after `warmup`.
std::vector<std::uint32_t> touch_with_handler(lazymig::uffd::Uffd& u, std::byte* base, int warmup, int pages,
                                              const std::function<bool(std::byte*)>& resolve, std::string* error) {
    const int stop = ::eventfd(0, EFD_CLOEXEC);
    std::thread handler([&] {
        std::array<lazymig::uffd::Event, 64> events;
        pollfd fds[2] = {{u.fd(), POLLIN, 0}, {stop, POLLIN, 0}};
        for (;;) {
            if (::poll(fds, 2, -1) < 0) {
                if (errno == EINTR) continue;
                return;
            }
            if (fds[1].revents) return;
            auto got = u.read_events(events);
            if (!got) {
                *error = got.error().message();
                return;
            }
            for (std::size_t i = 0; i < *got; ++i) {
                if (events[i].kind != lazymig::uffd::Event::Kind::pagefault) continue;
                auto* page = reinterpret_cast<std::byte*>(events[i].address & ~std::uint64_t(kPage - 1));
                if (!resolve(page)) return;
            }
        }
    });
    const int total = warmup + pages;
    std::vector<std::uint32_t> order(static_cast<std::size_t>(total));
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), std::mt19937_64(42));
    std::vector<std::uint32_t> ns;
    ns.reserve(static_cast<std::size_t>(pages));
    for (int k = 0; k < total; ++k) {
        auto* p = reinterpret_cast<volatile std::uint64_t*>(base + std::size_t(order[k]) * kPage);
        const std::uint64_t t0 = now_ns();
        (void)*p;
        const std::uint64_t t1 = now_ns();
        if (k >= warmup) ns.push_back(static_cast<std::uint32_t>(t1 - t0));
    }
    const std::uint64_t one = 1;
    (void)!::write(stop, &one, sizeof one);
    handler.join();
    ::close(stop);
    return ns;
}

}  // namespace

int tcp_listen_loopback(int* port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("bench floor: socket");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("bench floor: bind");
    if (::listen(fd, 4) != 0) die("bench floor: listen");
    socklen_t len = sizeof a;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) die("bench floor: getsockname");
    *port = ntohs(a.sin_port);
    return fd;
}

int tcp_connect_loopback(int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("bench floor: socket");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("bench floor: connect");
    return fd;
}

Fields floor_tcp_rtt(int warmup, int iterations) {
    int port = 0;
    const int lfd = tcp_listen_loopback(&port);
    const pid_t server = fork_or_die();
    if (server == 0) {  // answers every 16-byte request with 4 KiB, until the client closes
        const int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) die("bench floor: accept");
        set_nodelay(c);
        std::byte* reply = map_populated(kPage);
        std::memset(reply, 0x5a, kPage);
        std::array<std::byte, 16> req;
        while (recv_all(c, req.data(), req.size())) send_all(c, reply, kPage);
        std::_Exit(0);
    }
    ::close(lfd);
    const int fd = tcp_connect_loopback(port);
    set_nodelay(fd);
    std::byte* reply = map_populated(kPage);
    std::array<std::byte, 16> req{};
    std::vector<std::uint32_t> ns;
    ns.reserve(static_cast<std::size_t>(iterations));
    for (int k = 0; k < warmup + iterations; ++k) {
        const std::uint64_t t0 = now_ns();
        send_all(fd, req.data(), req.size());
        recv_all(fd, reply, kPage);
        const std::uint64_t t1 = now_ns();
        if (k >= warmup) ns.push_back(static_cast<std::uint32_t>(t1 - t0));
    }
    ::close(fd);
    reap(server);
    return latency_fields("rtt", ns);
}

Fields floor_uffd_copy(int warmup, int pages) {
    auto u = lazymig::uffd::Uffd::open(0);
    if (!u) return Fields().set_str("error", u.error().message());
    const std::size_t len = std::size_t(warmup + pages) * kPage;
    void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) die("bench floor: mmap");
    ::madvise(m, len, MADV_NOHUGEPAGE);
    auto* base = static_cast<std::byte*>(m);
    if (auto r = u->register_range(base, len, UFFDIO_REGISTER_MODE_MISSING); !r)
        return Fields().set_str("error", r.error().message());
    std::byte* src = map_populated(kPage);
    std::memset(src, 0x5a, kPage);
    std::string error;
    auto ns = touch_with_handler(*u, base, warmup, pages, [&](std::byte* page) {
        auto o = u->copy(page, src, kPage);
        if (o.ok() || o.err == EEXIST) return true;
        error = "UFFDIO_COPY: " + std::string(std::strerror(o.err));
        return false;
    }, &error);
    if (!error.empty()) return Fields().set_str("error", error);
    return latency_fields("uffd", ns);
}

Fields floor_uffd_continue(int warmup, int pages) {
    auto u = lazymig::uffd::Uffd::open(UFFD_FEATURE_MINOR_SHMEM);
    if (!u) return Fields().set_str("error", u.error().message());
    const std::size_t len = std::size_t(warmup + pages) * kPage;
    const int fd = ::memfd_create("bench-floor", MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(len)) != 0 || ::fallocate(fd, 0, 0, static_cast<off_t>(len)) != 0)
        die("bench floor: memfd");
    void* a = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    void* g = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (a == MAP_FAILED || g == MAP_FAILED) die("bench floor: mmap memfd");
    auto* alias = static_cast<std::byte*>(a);
    auto* guest = static_cast<std::byte*>(g);
    if (auto r = u->register_range(guest, len, UFFDIO_REGISTER_MODE_MINOR); !r)
        return Fields().set_str("error", r.error().message());
    std::byte* src = map_populated(kPage);
    std::memset(src, 0x5a, kPage);
    std::string error;
    auto ns = touch_with_handler(*u, guest, warmup, pages, [&](std::byte* page) {
        std::memcpy(alias + (page - guest), src, kPage);
        auto o = u->continue_range(page, kPage);
        if (o.ok() || o.err == EEXIST) return true;
        error = "UFFDIO_CONTINUE: " + std::string(std::strerror(o.err));
        return false;
    }, &error);
    if (!error.empty()) return Fields().set_str("error", error);
    return latency_fields("uffd_minor", ns);
}

Fields floor_remote_fault(int warmup, int pages) {
    int port = 0;
    const int lfd = tcp_listen_loopback(&port);
    const pid_t server = fork_or_die();  // before any thread of this process exists
    if (server == 0) {                   // the "source": a 4 KiB page for each 16-byte request
        const int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) die("bench floor: accept");
        set_nodelay(c);
        std::byte* page = map_populated(kPage);
        std::memset(page, 0x5a, kPage);
        std::array<std::byte, 16> req;
        while (recv_all(c, req.data(), req.size())) send_all(c, page, kPage);
        std::_Exit(0);
    }
    ::close(lfd);
    const int fd = tcp_connect_loopback(port);
    set_nodelay(fd);
    auto u = lazymig::uffd::Uffd::open(0);
    if (!u) return Fields().set_str("error", u.error().message());
    const std::size_t len = std::size_t(warmup + pages) * kPage;
    void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) die("bench floor: mmap");
    ::madvise(m, len, MADV_NOHUGEPAGE);
    auto* base = static_cast<std::byte*>(m);
    if (auto r = u->register_range(base, len, UFFDIO_REGISTER_MODE_MISSING); !r)
        return Fields().set_str("error", r.error().message());
    std::byte* buf = map_populated(kPage);
    std::string error;
    auto ns = touch_with_handler(*u, base, warmup, pages, [&](std::byte* page) {
        std::array<std::uint64_t, 2> req{reinterpret_cast<std::uintptr_t>(page), 1};
        send_all(fd, req.data(), sizeof req);
        recv_all(fd, buf, kPage);
        auto o = u->copy(page, buf, kPage);
        if (o.ok() || o.err == EEXIST) return true;
        error = "UFFDIO_COPY: " + std::string(std::strerror(o.err));
        return false;
    }, &error);
    ::close(fd);
    reap(server);
    if (!error.empty()) return Fields().set_str("error", error);
    return latency_fields("remote", ns);
}

Fields floor_tcp_stream(std::size_t warmup_bytes, std::size_t bytes) {
    constexpr std::size_t kChunk = 1 << 20;
    int port = 0;
    const int lfd = tcp_listen_loopback(&port);
    const pid_t sender = fork_or_die();
    if (sender == 0) {
        ::close(lfd);
        const int fd = tcp_connect_loopback(port);
        std::byte* buf = map_populated(kChunk);
        fill_content(buf, kChunk);
        for (std::size_t sent = 0; sent < warmup_bytes + bytes; sent += kChunk) send_all(fd, buf, kChunk);
        ::close(fd);
        std::_Exit(0);
    }
    const int fd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) die("bench floor: accept");
    ::close(lfd);
    std::byte* buf = map_populated(kChunk);
    std::size_t got = 0;
    std::uint64_t t0 = 0;
    for (;;) {
        const ssize_t n = ::recv(fd, buf, kChunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("bench floor: recv");
        if (n == 0) break;
        const std::size_t before = got;
        got += static_cast<std::size_t>(n);
        if (before < warmup_bytes && got >= warmup_bytes) t0 = now_ns();
    }
    const std::uint64_t t1 = now_ns();
    ::close(fd);
    reap(sender);
    if (got < warmup_bytes + bytes) return Fields().set_str("error", "tcp stream: short transfer");
    return Fields().set("tcp_gbps", double(got - warmup_bytes) / double(t1 - t0));
}

Fields floor_tcp_stream_cold(std::size_t bytes) {
    constexpr std::size_t kChunk = 1 << 20;
    int port = 0;
    const int lfd = tcp_listen_loopback(&port);
    const pid_t sender = fork_or_die();
    if (sender == 0) {  // like a source: guest RAM populated and written, sent once, in order
        ::close(lfd);
        std::byte* ram = map_populated(bytes);
        fill_content(ram, bytes);
        const int fd = tcp_connect_loopback(port);
        char go = 0;
        if (!recv_all(fd, &go, 1)) std::_Exit(1);
        for (std::size_t off = 0; off < bytes; off += kChunk) send_all(fd, ram + off, std::min(kChunk, bytes - off));
        ::close(fd);
        std::_Exit(0);
    }
    const int fd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) die("bench floor: accept");
    ::close(lfd);
    std::byte* ram = map_populated(bytes);  // like a destination: populated, never touched
    const char go = 1;
    send_all(fd, &go, 1);
    const std::uint64_t t0 = now_ns();
    std::size_t got = 0;
    while (got < bytes) {
        const ssize_t n = ::recv(fd, ram + got, std::min(kChunk, bytes - got), 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("bench floor: recv");
        got += static_cast<std::size_t>(n);
    }
    const std::uint64_t t1 = now_ns();
    ::close(fd);
    reap(sender);
    ::munmap(ram, bytes);
    return Fields().set("tcp_cold_gbps", double(bytes) / double(t1 - t0));
}

Fields floor_pipeline(std::size_t bytes) {
    constexpr std::size_t kChunk = 1 << 20;  // every syscall moves 1 MiB, as the push does
    bytes = std::max(kChunk, bytes / kChunk * kChunk);
    // The source's guest RAM: a memfd whose every page was written before (page cache).
    const int src = ::memfd_create("bench-pipeline-src", MFD_CLOEXEC);
    if (src < 0 || ::ftruncate(src, static_cast<off_t>(bytes)) != 0) die("bench floor: pipeline memfd");
    {
        void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, src, 0);
        if (m == MAP_FAILED) die("bench floor: pipeline mmap");
        fill_content(static_cast<std::byte*>(m), bytes);
        ::munmap(m, bytes);
    }
    int port = 0;
    const int lfd = tcp_listen_loopback(&port);
    const pid_t receiver = fork_or_die();
    if (receiver == 0) {  // the destination: recv(MSG_WAITALL) 1 MiB into one buffer, pwrite into a fallocated memfd
        const int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) die("bench floor: accept");
        const int dst = ::memfd_create("bench-pipeline-dst", MFD_CLOEXEC);
        if (dst < 0 || ::ftruncate(dst, static_cast<off_t>(bytes)) != 0 ||
            ::fallocate(dst, 0, 0, static_cast<off_t>(bytes)) != 0)
            die("bench floor: pipeline destination memfd");
        std::byte* buf = map_populated(kChunk);
        const char ready = 1;
        send_all(c, &ready, 1);
        for (std::size_t off = 0; off < bytes; off += kChunk) {
            const ssize_t n = ::recv(c, buf, kChunk, MSG_WAITALL);
            if (n != static_cast<ssize_t>(kChunk)) die("bench floor: pipeline recv");
            if (::pwrite(dst, buf, kChunk, static_cast<off_t>(off)) != static_cast<ssize_t>(kChunk))
                die("bench floor: pipeline pwrite");
        }
        send_all(c, &ready, 1);  // every byte is in the destination's file
        std::_Exit(0);
    }
    ::close(lfd);
    const int fd = tcp_connect_loopback(port);
    std::byte* buf = map_populated(kChunk);
    char ack = 0;
    if (!recv_all(fd, &ack, 1)) die("bench floor: pipeline receiver gone");
    const std::uint64_t t0 = now_ns();
    for (std::size_t off = 0; off < bytes; off += kChunk) {
        if (::pread(src, buf, kChunk, static_cast<off_t>(off)) != static_cast<ssize_t>(kChunk))
            die("bench floor: pipeline pread");
        send_all(fd, buf, kChunk);
    }
    if (!recv_all(fd, &ack, 1)) die("bench floor: pipeline receiver gone");
    const std::uint64_t t1 = now_ns();
    ::close(fd);
    ::close(src);
    reap(receiver);
    return Fields().set("pipeline_gbps", double(bytes) / double(t1 - t0));
}

Fields floor_memcpy(std::size_t bytes, int passes) {
    std::byte* a = map_populated(bytes);
    std::byte* b = map_populated(bytes);
    fill_content(a, bytes);
    std::vector<double> gbps;
    for (int k = 0; k < passes; ++k) {
        const std::uint64_t t0 = now_ns();
        std::memcpy(k % 2 ? a : b, k % 2 ? b : a, bytes);
        const std::uint64_t t1 = now_ns();
        gbps.push_back(double(bytes) / double(t1 - t0));
    }
    std::sort(gbps.begin(), gbps.end());
    ::munmap(a, bytes);
    ::munmap(b, bytes);
    return Fields().set("memcpy_gbps", gbps[gbps.size() / 2]);  // the median pass
}

}  // namespace bench
