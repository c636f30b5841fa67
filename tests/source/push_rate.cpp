// source_push_rate — what the source's bulk path moves per second over loopback TCP,
// beside the raw floor measured in the same run (pread into a reused buffer → send →
// recv into a reused buffer). Not a test: a tool for choosing the frame size, the
// channel count and the senders' nice value.
//
//   source_push_rate SIZE_MIB [nice]   prints one line per (channels, pages per frame)
//   source_push_rate SIZE_MIB nice CHANNELS PAGES   one push only (for perf, strace)
//   source_push_rate SIZE_MIB nice latency          demand round trips during a push
//
// Guest RAM is a memfd written by a child process, so this process reaches it only
// through the kernel, as a source that never touched the guest's pages would.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "precopy/source.hpp"
#include "src/net/channel.hpp"
#include "src/net/frames.hpp"
#include <algorithm>
#include "src/net/socket.hpp"

using namespace lazymig;
using Clock = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const Error& e) {
    std::fprintf(stderr, "%s\n", e.message().c_str());
    std::exit(1);
}

// Drains a channel's peer into a reused 4 MiB buffer until end of stream.
void drain(net::Channel& c, std::size_t* got) {
    std::vector<std::byte> buf(4 << 20);
    for (;;) {
        auto n = c.recv_some(buf.data(), buf.size());
        if (!n || *n == 0) return;
        *got += *n;
    }
}

struct Pair {
    std::unique_ptr<net::Channel> tx, rx;
};

std::vector<Pair> channels(net::Transport& listener, net::Transport& connector, std::size_t n) {
    std::vector<Pair> out;
    for (std::size_t i = 0; i < n; ++i) {
        Pair p;
        std::thread acc([&] {
            auto c = listener.accept("bulk", std::chrono::milliseconds(5000), false);
            if (!c) die(c.error());
            p.rx = std::move(*c);
        });
        auto c = connector.connect("bulk", false);
        if (!c) die(c.error());
        p.tx = std::move(*c);
        acc.join();
        out.push_back(std::move(p));
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    const std::size_t size = std::size_t(argc > 1 ? std::atoi(argv[1]) : 256) << 20;
    const int nice = argc > 2 ? std::atoi(argv[2]) : 0;
    const int fd = ::memfd_create("push-rate", MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, off_t(size)) != 0) die(Error{errno, "memfd"});
    if (pid_t p = ::fork(); p == 0) {
        auto* m = static_cast<char*>(::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
        for (std::size_t i = 0; i < size; i += 4096) m[i] = char(i >> 12 | 1), m[i + 100] = 7;
        ::_exit(0);
    } else {
        ::waitpid(p, nullptr, 0);
    }
    void* host = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const GuestRegion region{.name = "ram0", .host = host, .size = size, .page_size = 4096,
                             .backing = Backing::memfd, .fd = fd, .fd_offset = 0};
    auto reader = source::make_page_reader(std::span(&region, 1), {});
    if (!reader) die(reader.error());
    auto stop = net::ShutdownEvent::create();
    if (!stop) die(stop.error());
    auto listener = net::tcp_listener("tcp:127.0.0.1:0", stop->fd());
    if (!listener) die(listener.error());
    auto connector = net::tcp_connector((*listener)->local_uri(), stop->fd(), std::chrono::milliseconds(5000));
    if (!connector) die(connector.error());

    if (argc > 3 && std::string_view(argv[3]) == "latency") {
        // Urgent channel: this side serves; a "destination" thread requests one page at a
        // time and times the reply, while one sender pushes on a bulk channel.
        auto urgent = channels(**listener, **connector, 1);
        auto bulk = channels(**listener, **connector, 1);
        std::size_t got = 0;
        std::thread rx([&] { drain(*bulk[0].rx, &got); });
        source::SentMap sent(std::span(&region, 1));
        source::SourceStats stats;
        std::atomic<std::uint64_t> bw{0};
        std::atomic<std::uint32_t> batch{256};
        source::DemandGate gate;
        source::Pusher pusher(std::span(&region, 1), **reader, sent, stats, source::PushConfig{&bw, &batch, &gate, nice});
        net::FrameReader sframes(*urgent[0].tx);
        Result<void> served;
        auto sframer = source::PageFramer::create(std::span(&region, 1), **reader);
        if (!sframer) die(sframer.error());
        std::thread server([&] {
            served = source::serve_loop(sframes, *urgent[0].tx, std::span(&region, 1), **sframer, sent, &pusher, stats,
                                        gate, [] { return Result<void>(); });
        });
        if (auto s = pusher.start({bulk[0].tx.get()}, [](const Error& e) { die(e); }); !s) die(s.error());
        net::FrameReader dframes(*urgent[0].rx);
        std::vector<double> us;
        std::vector<std::byte> page(4096 + 64);
        std::uint64_t x = 12345;
        const std::uint64_t pages = size / 4096;
        while (stats.pushed_pages.get() < pages * 9 / 10) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            const auto t0 = Clock::now();
            if (auto r = net::send_frame(*urgent[0].rx, proto::encode(proto::PageRequest{0, 1, (x >> 20) % pages})); !r) die(r.error());
            auto h = dframes.next();
            if (!h || !*h) die(h ? Error{0, "closed"} : h.error());
            std::vector<std::byte> body((*h)->length);
            if (auto r = dframes.read(body.data(), body.size()); !r) die(r.error());
            us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        }
        (void)net::send_frame(*urgent[0].rx, proto::encode_empty(proto::Type::resumed));
        (void)net::send_frame(*urgent[0].rx, proto::encode_empty(proto::Type::complete));
        server.join();
        pusher.join();
        bulk[0].tx.reset();
        rx.join();
        std::sort(us.begin(), us.end());
        std::printf("demand during push, nice=%d: %zu requests p50 %.0f us p90 %.0f us p99 %.0f us; yields %llu\n", nice,
                    us.size(), us[us.size() / 2], us[us.size() * 9 / 10], us[us.size() * 99 / 100],
                    static_cast<unsigned long long>(stats.push_yields.get()));
        return 0;
    }
    const bool one = argc > 4;
    std::vector<std::size_t> counts{1, 2};
    std::vector<std::uint32_t> sizes{64, 256, 1024};
    if (one) {
        counts = {std::size_t(std::atoi(argv[3]))};
        sizes = {std::uint32_t(std::atoi(argv[4]))};
    }
    // The floor: pread 1 MiB into a reused buffer, send, recv into a reused buffer.
    if (!one) {
        auto ch = channels(**listener, **connector, 1);
        std::size_t got = 0;
        std::thread rx([&] { drain(*ch[0].rx, &got); });
        std::vector<std::byte> buf(1 << 20);
        const auto t0 = Clock::now();
        for (std::size_t off = 0; off < size; off += buf.size()) {
            if (::pread(fd, buf.data(), buf.size(), off_t(off)) != ssize_t(buf.size())) die(Error{errno, "pread"});
            const iovec v{buf.data(), buf.size()};
            if (auto s = ch[0].tx->send(std::span(&v, 1)); !s) die(s.error());
        }
        ch[0].tx.reset();
        rx.join();
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        std::printf("floor  pread(1 MiB)->send->recv               %6.2f GB/s\n", double(size) / s / 1e9);
    }
    for (std::size_t n : counts) {
        for (std::uint32_t pages : sizes) {
            auto ch = channels(**listener, **connector, n);
            std::vector<std::size_t> got(n);
            std::vector<std::thread> rx;
            for (std::size_t i = 0; i < n; ++i) rx.emplace_back([&, i] { drain(*ch[i].rx, &got[i]); });
            source::SentMap sent(std::span(&region, 1));
            source::SourceStats stats;
            std::atomic<std::uint64_t> bw{0};
            std::atomic<std::uint32_t> batch{pages};
            source::DemandGate gate;
            source::Pusher pusher(std::span(&region, 1), **reader, sent, stats,
                                  source::PushConfig{&bw, &batch, &gate, nice});
            std::vector<net::Channel*> tx;
            for (auto& p : ch) tx.push_back(p.tx.get());
            rusage u0{}, u1{};
            ::getrusage(RUSAGE_SELF, &u0);
            const auto t0 = Clock::now();
            if (auto s = pusher.start(tx, [](const Error& e) { die(e); }); !s) die(s.error());
            pusher.join();
            for (auto& p : ch) p.tx.reset();
            for (auto& t : rx) t.join();
            const double s = std::chrono::duration<double>(Clock::now() - t0).count();
            ::getrusage(RUSAGE_SELF, &u1);
            // Page faults taken by this process (senders, receivers, staging) during the push:
            // a path that read guest RAM through its mapping would take one per 4 KiB page.
            std::printf("lazymig push  channels=%zu pages/frame=%-4u     %6.2f GB/s  %.2f page faults/MiB\n", n, pages,
                        double(size) / s / 1e9, double(u1.ru_minflt - u0.ru_minflt) / double(size >> 20));
        }
    }
    return 0;
}
