// serve_loop: demand requests answered from a snapshot on the urgent channel, the gate
// raised while one is in service (so the pushers yield), peers' mistakes refused.
#include <doctest/doctest.h>

#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include "precopy/source.hpp"
#include "src/failpoint.hpp"
#include "src/net/frames.hpp"
#include "tests/source/util.hpp"

using namespace source_test;
using lazymig::Backing;
using lazymig::Error;
using lazymig::GuestRegion;
namespace source = lazymig::source;
namespace failpoint = lazymig::failpoint;
namespace net = lazymig::net;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kPages = 512;

void send_all(int fd, const proto::Frame& f) {
    REQUIRE(::send(fd, f.data(), f.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(f.size()));
}

// Reads one whole frame from the test's end of a socket and verifies it.
Received read_frame(int fd) {
    std::vector<std::byte> frame(proto::kHeaderSize);
    REQUIRE(::recv(fd, frame.data(), frame.size(), MSG_WAITALL) == static_cast<ssize_t>(frame.size()));
    auto h = proto::parse_header(std::span<const std::byte, proto::kHeaderSize>(frame.data(), proto::kHeaderSize), "t");
    REQUIRE_MESSAGE(h.has_value(), err_of(h));
    frame.resize(proto::kHeaderSize + h->length);
    REQUIRE(::recv(fd, frame.data() + proto::kHeaderSize, h->length, MSG_WAITALL) == static_cast<ssize_t>(h->length));
    std::size_t pos = 0;
    return decode_frame(frame, &pos, kPage);
}

// A blocking point a test opens: the thread that reaches it waits until open().
struct Latch {
    std::mutex mu;
    std::condition_variable cv;
    int reached = 0;
    bool opened = false;
    void arrive_and_wait() {
        std::unique_lock l(mu);
        ++reached;
        cv.notify_all();
        cv.wait(l, [&] { return opened; });
    }
    bool reach(int n) {
        std::unique_lock l(mu);
        return cv.wait_for(l, std::chrono::seconds(20), [&] { return reached >= n; });
    }
    void open() {
        std::lock_guard l(mu);
        opened = true;
        cv.notify_all();
    }
};

struct Serve {
    Serve() {
        auto m = TestMemory::create("ram0", kPages * kPage, Backing::memfd);
        REQUIRE_MESSAGE(m.has_value(), err_of(m));
        mem = std::move(*m);
        for (std::uint64_t p = 0; p < kPages; ++p)
            if (p % 5 != 0) std::memset(mem.data() + p * kPage, int(p % 251) + 1, kPage);
        region = mem.region();
        auto r = source::make_page_reader(std::span(&region, 1), {});
        REQUIRE_MESSAGE(r.has_value(), err_of(r));
        reader = std::move(*r);
        sent = std::make_unique<source::SentMap>(std::span(&region, 1));
        auto st = net::ShutdownEvent::create();
        REQUIRE_MESSAGE(st.has_value(), err_of(st));
        shutdown = std::move(*st);
        auto [a, b] = socket_pair();
        auto c = net::stream_channel(net::Fd(a), "urgent channel", shutdown.fd());
        REQUIRE_MESSAGE(c.has_value(), err_of(c));
        urgent = std::move(*c);
        peer = b;
        frames = std::make_unique<net::FrameReader>(*urgent);
    }
    ~Serve() {
        failpoint::disarm_all();
        if (loop.joinable()) {
            shutdown.signal();
            loop.join();
        }
        ::close(peer);
    }
    void run(source::Pusher* pusher = nullptr) {
        auto framer = source::PageFramer::create(std::span(&region, 1), *reader);
        REQUIRE_MESSAGE(framer.has_value(), framer.error().message());
        loop = std::thread([this, pusher, f = std::shared_ptr<source::PageFramer>(std::move(*framer))] {
            result = source::serve_loop(*frames, *urgent, std::span(&region, 1), *f, *sent, pusher, stats, gate,
                                        [this]() -> lazymig::Result<void> {
                                            ++resumed;
                                            return {};
                                        });
        });
    }
    lazymig::Result<void> finish() {
        loop.join();
        return result;
    }
    void check_pages(const Received& f, std::uint64_t first, std::uint32_t count) {
        REQUIRE(f.type == proto::Type::pages);
        CHECK(f.meta.first == first);
        CHECK(f.meta.count == count);
        std::size_t d = 0;
        for (std::uint32_t i = 0; i < count; ++i) {
            const std::uint64_t p = first + i;
            CHECK(f.meta.is_zero(i) == (p % 5 == 0));
            if (!f.meta.is_zero(i)) CHECK(std::memcmp(f.data.data() + d++ * kPage, mem.data() + p * kPage, kPage) == 0);
        }
    }

    TestMemory mem;
    GuestRegion region;
    std::unique_ptr<source::PageReader> reader;
    std::unique_ptr<source::SentMap> sent;
    source::SourceStats stats;
    source::DemandGate gate;
    net::ShutdownEvent shutdown;
    std::unique_ptr<net::Channel> urgent;
    std::unique_ptr<net::FrameReader> frames;
    int peer = -1;
    std::thread loop;
    lazymig::Result<void> result;
    int resumed = 0;
};

}  // namespace

TEST_CASE("source/serve-answers-requests-then-completes") {
    Serve s;
    s.run();
    send_all(s.peer, proto::encode(proto::PageRequest{0, 16, 100}));
    s.check_pages(read_frame(s.peer), 100, 16);
    send_all(s.peer, proto::encode_empty(proto::Type::resumed));
    send_all(s.peer, proto::encode(proto::PageRequest{0, 1, 511}));
    s.check_pages(read_frame(s.peer), 511, 1);
    send_all(s.peer, proto::encode_empty(proto::Type::complete));
    auto r = s.finish();
    CHECK_MESSAGE(r.has_value(), err_of(r));
    CHECK(s.resumed == 1);
    CHECK(s.stats.requests.get() == 2);
    CHECK(s.stats.demanded_pages.get() == 17);
    CHECK(s.stats.sent_pages.get() == 17);
    CHECK(s.sent->sent(0, 100));
    CHECK(s.sent->sent(0, 511));
    CHECK_FALSE(s.sent->sent(0, 99));
    CHECK(s.gate.in_service() == 0);
}

TEST_CASE("source/serve-raises-the-gate-and-the-pusher-yields-to-it") {
    Serve s;
    // The pusher, on its own bulk channel, drained by a receiver.
    auto [a, b] = socket_pair();
    auto bulk = net::stream_channel(net::Fd(a), "bulk channel 0", s.shutdown.fd());
    REQUIRE_MESSAGE(bulk.has_value(), err_of(bulk));
    std::atomic<std::uint64_t> bw{0};
    std::atomic<std::uint32_t> batch{64};
    source::SourceStats push_stats;
    source::SentMap push_sent(std::span(&s.region, 1));
    source::Pusher pusher(std::span(&s.region, 1), *s.reader, push_sent, push_stats,
                          source::PushConfig{&bw, &batch, &s.gate, 0});

    // The request is held inside its service, after the gate went up.
    Latch serving, yielded;
    std::atomic<std::uint32_t> gate_in_service{0};
    failpoint::arm("source_serve_request", [&](const failpoint::Site&) {
        gate_in_service = s.gate.in_service();
        serving.arrive_and_wait();
        return 0;
    });
    failpoint::arm("source_push_yield", [&](const failpoint::Site&) {
        yielded.arrive_and_wait();
        return 0;
    });
    yielded.open();  // count the yields only; do not hold the pusher here
    s.run(&pusher);
    send_all(s.peer, proto::encode(proto::PageRequest{0, 4, 300}));
    REQUIRE_MESSAGE(serving.reach(1), "the request never reached its service");
    CHECK(gate_in_service == 1);

    std::vector<Received> pushed;
    std::thread rx([&] { pushed = receive_until_done(b, kPage); });
    auto started = pusher.start({bulk->get()}, [](const Error& e) { FAIL("pusher: ", e.message()); });
    REQUIRE_MESSAGE(started.has_value(), err_of(started));
    REQUIRE_MESSAGE(yielded.reach(1), "the pusher never yielded to the request in service");
    CHECK(push_stats.pushed_pages.get() == 0);  // it waits at the gate before its first batch

    serving.open();  // the reply goes out, the gate comes down, the pusher goes on
    s.check_pages(read_frame(s.peer), 300, 4);
    pusher.join();
    rx.join();
    CHECK(push_stats.pushed_pages.get() == kPages);
    REQUIRE(!pushed.empty());
    CHECK(pushed.back().type == proto::Type::push_done);
    // The sender had taken its first batch (0..63) before it yielded; the request's
    // hint (page 304, after the reply) comes next, ahead of the sweep's 64.
    REQUIRE(pushed.size() > 2);
    CHECK(pushed[0].meta.first == 0);
    CHECK(pushed[1].meta.first == 304);

    send_all(s.peer, proto::encode_empty(proto::Type::resumed));
    send_all(s.peer, proto::encode_empty(proto::Type::complete));
    auto r = s.finish();
    CHECK_MESSAGE(r.has_value(), err_of(r));
    ::close(b);
}

TEST_CASE("source/serve-refuses-what-a-peer-must-not-send") {
    Serve s;
    s.run();
    std::string want;
    SUBCASE("pages outside the region") {
        send_all(s.peer, proto::encode(proto::PageRequest{0, 4, 510}));
        want = "urgent channel: PAGE_REQUEST for pages 510..513 of region 0, which has 512 pages";
    }
    SUBCASE("a region that does not exist") {
        send_all(s.peer, proto::encode(proto::PageRequest{3, 1, 0}));
        want = "urgent channel: PAGE_REQUEST for region 3, but there are 1 regions";
    }
    SUBCASE("COMPLETE before RESUMED") {
        send_all(s.peer, proto::encode_empty(proto::Type::complete));
        want = "urgent channel: COMPLETE before RESUMED";
    }
    auto r = s.finish();
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().kind == lazymig::ErrorClass::peer_violation);
    CHECK(r.error().message() == want);
    CHECK(s.gate.in_service() == 0);  // lowered on the way out too
}

TEST_CASE("source/serve-back-to-back-requests-do-not-starve-the-pusher") {
    // A destination that requests the next page as soon as a reply arrives keeps the gate
    // up almost always; a woken sender finds it raised again before it runs. It must still
    // go on once the requests it waited for were served (a gate that waited for the count
    // itself starved the push here: the request limit below was reached).
    Serve s;
    auto [a, b] = socket_pair();
    auto bulk = net::stream_channel(net::Fd(a), "bulk channel 0", s.shutdown.fd());
    REQUIRE_MESSAGE(bulk.has_value(), err_of(bulk));
    std::atomic<std::uint64_t> bw{0};
    std::atomic<std::uint32_t> batch{16};
    // The pusher sweeps its own, larger memory: 4096 pages in 256 batches, each behind
    // the gate.
    auto big = TestMemory::create("ram1", 4096 * kPage, Backing::memfd);
    REQUIRE_MESSAGE(big.has_value(), err_of(big));
    const GuestRegion big_region = big->region();
    auto big_reader = source::make_page_reader(std::span(&big_region, 1), {});
    REQUIRE_MESSAGE(big_reader.has_value(), err_of(big_reader));
    source::SourceStats push_stats;
    source::SentMap push_sent(std::span(&big_region, 1));
    source::Pusher pusher(std::span(&big_region, 1), **big_reader, push_sent, push_stats,
                          source::PushConfig{&bw, &batch, &s.gate, 0});
    s.run();
    std::atomic<bool> pushed_all{false};
    std::thread rx([&] {
        auto frames = receive_until_done(b, kPage);
        pushed_all = !frames.empty() && frames.back().type == proto::Type::push_done;
    });
    auto started = pusher.start({bulk->get()}, [](const Error& e) { FAIL("pusher: ", e.message()); });
    REQUIRE_MESSAGE(started.has_value(), err_of(started));
    int requests = 0;
    while (!pushed_all.load() && requests < 200000) {
        send_all(s.peer, proto::encode(proto::PageRequest{0, 1, std::uint64_t(requests % kPages)}));
        (void)read_frame(s.peer);
        ++requests;
    }
    MESSAGE(requests, " requests while 4096 pages were pushed; the sender yielded ", push_stats.push_yields.get(),
            " times");
    CHECK_MESSAGE(pushed_all.load(), "the pusher was starved by back-to-back demand requests");
    if (!pushed_all) pusher.stop();
    s.shutdown.signal();  // ends the serve loop and a starved sender's channel waits
    pusher.join();
    ::shutdown(b, SHUT_RDWR);
    rx.join();
    ::close(b);
}
