// Pusher: N senders over N channels, each its own share, every page exactly once and
// verified; hints go to the sender that owns the page; the senders yield to demand.
#include <doctest/doctest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <map>
#include <thread>

#include "precopy/source.hpp"
#include "src/failpoint.hpp"
#include "tests/source/util.hpp"

using namespace source_test;
using lazymig::Backing;
using lazymig::Error;
using lazymig::GuestRegion;
namespace source = lazymig::source;
namespace failpoint = lazymig::failpoint;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kPages = 1000;  // not a multiple of 3, of a batch, of a frame

// Every 7th page stays zero; the others carry their page number in every word.
void fill(std::byte* base) {
    for (std::uint64_t p = 0; p < kPages; ++p) {
        if (p % 7 == 3) continue;
        auto* w = reinterpret_cast<std::uint64_t*>(base + p * kPage);
        for (std::size_t i = 0; i < kPage / 8; ++i) w[i] = p << 20 | i | 1ull << 63;
    }
}

struct Rig {
    explicit Rig(std::size_t channels, Backing backing = Backing::anon) {
        auto m = TestMemory::create("ram0", kPages * kPage, backing);
        REQUIRE_MESSAGE(m.has_value(), err_of(m));
        mem = std::move(*m);
        fill(mem.data());
        region = mem.region();
        auto r = source::make_page_reader(std::span(&region, 1), {});
        REQUIRE_MESSAGE(r.has_value(), err_of(r));
        reader = std::move(*r);
        sent = std::make_unique<source::SentMap>(std::span(&region, 1));
        pusher = std::make_unique<source::Pusher>(std::span(&region, 1), *reader, *sent, stats,
                                                  source::PushConfig{&bandwidth, &batch, &gate, 0});
        auto st = lazymig::net::ShutdownEvent::create();
        REQUIRE_MESSAGE(st.has_value(), err_of(st));
        shutdown = std::move(*st);
        for (std::size_t i = 0; i < channels; ++i) {
            auto [a, b] = socket_pair();
            auto c = lazymig::net::stream_channel(lazymig::net::Fd(a), "bulk channel " + std::to_string(i),
                                                  shutdown.fd());
            REQUIRE_MESSAGE(c.has_value(), err_of(c));
            chans.push_back(std::move(*c));
            peers.push_back(b);
        }
    }
    ~Rig() {
        failpoint::disarm_all();
        pusher.reset();
        chans.clear();
        for (int fd : peers) ::close(fd);
    }
    lazymig::Result<void> start() {
        std::vector<lazymig::net::Channel*> c;
        for (auto& ch : chans) c.push_back(ch.get());
        return pusher->start(c, [this](const Error& e) {
            ++errors;
            error = e.message();
        });
    }
    // One receiver thread per channel, until PUSH_DONE or end of stream.
    void receive() {
        got.resize(peers.size());
        std::vector<std::thread> t;
        for (std::size_t i = 0; i < peers.size(); ++i)
            t.emplace_back([this, i] { got[i] = receive_until_done(peers[i], kPage); });
        for (auto& th : t) th.join();
    }
    // Every page exactly once over all channels, holding what memory holds.
    void check_all_pages_once() {
        std::vector<int> seen(kPages, 0);
        for (auto& frames : got) {
            REQUIRE(!frames.empty());
            CHECK(frames.back().type == proto::Type::push_done);
            for (auto& f : frames) {
                if (f.type != proto::Type::pages) continue;
                std::size_t d = 0;
                for (std::uint32_t i = 0; i < f.meta.count; ++i) {
                    const std::uint64_t p = f.meta.first + i;
                    REQUIRE(p < kPages);
                    ++seen[p];
                    CHECK(f.meta.is_zero(i) == (p % 7 == 3));
                    if (f.meta.is_zero(i)) continue;
                    CHECK(std::memcmp(f.data.data() + d++ * kPage, mem.data() + p * kPage, kPage) == 0);
                }
            }
        }
        for (std::uint64_t p = 0; p < kPages; ++p) {
            CAPTURE(p);
            CHECK(seen[p] == 1);
        }
        CHECK(stats.pushed_pages.get() == kPages);
        CHECK(stats.sent_pages.get() == kPages);
        CHECK(stats.zero_pages.get() == (kPages + 3) / 7);
    }

    TestMemory mem;
    GuestRegion region;
    std::unique_ptr<source::PageReader> reader;
    std::unique_ptr<source::SentMap> sent;
    source::SourceStats stats;
    std::atomic<std::uint64_t> bandwidth{0};
    std::atomic<std::uint32_t> batch{64};
    source::DemandGate gate;
    std::unique_ptr<source::Pusher> pusher;
    lazymig::net::ShutdownEvent shutdown;
    std::vector<std::unique_ptr<lazymig::net::Channel>> chans;
    std::vector<int> peers;
    std::vector<std::vector<Received>> got;
    std::atomic<int> errors{0};
    std::string error;
};

// Counts failpoint hits; a test waits for a count with a deadline, so a sender that
// never reaches the point fails the test instead of hanging it.
struct Hits {
    std::mutex mu;
    std::condition_variable cv;
    int n = 0;
    int hit() {
        std::lock_guard l(mu);
        ++n;
        cv.notify_all();
        return 0;
    }
    bool reach(int want) {
        std::unique_lock l(mu);
        return cv.wait_for(l, std::chrono::seconds(20), [&] { return n >= want; });
    }
};

// Share i of n: [P*i/n, P*(i+1)/n).
std::uint64_t share(std::size_t i, std::size_t n) { return kPages * i / n; }

}  // namespace

TEST_CASE("source/pusher-one-channel") {
    Rig rig(1);
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    rig.receive();
    rig.pusher->join();
    CHECK(rig.errors == 0);
    rig.check_all_pages_once();
    CHECK(rig.got[0].size() == (kPages + 63) / 64 + 1);  // frames of 64 pages, then PUSH_DONE
}

TEST_CASE("source/pusher-three-channels-each-its-share") {
    Rig rig(3, Backing::memfd);
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    rig.receive();
    rig.pusher->join();
    CHECK(rig.errors == 0);
    rig.check_all_pages_once();
    for (std::size_t c = 0; c < 3; ++c) {
        CAPTURE(c);
        std::uint64_t expect = share(c, 3);
        for (auto& f : rig.got[c]) {
            if (f.type != proto::Type::pages) continue;
            CHECK(f.meta.first == expect);  // in address order, contiguous, within the share
            expect = f.meta.first + f.meta.count;
        }
        CHECK(expect == share(c + 1, 3));
    }
}

TEST_CASE("source/pusher-hints-go-to-the-owner-first") {
    Rig rig(3);
    // Given before start: kept, then handed to the sender owning each page.
    rig.pusher->hint(0, 900);  // share 2 = [666, 1000)
    rig.pusher->hint(0, 400);  // share 1 = [333, 666)
    rig.pusher->hint(0, 5000);  // outside the region: dropped
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    rig.receive();
    rig.pusher->join();
    CHECK(rig.errors == 0);
    rig.check_all_pages_once();
    CHECK(rig.got[0].front().meta.first == 0);
    CHECK(rig.got[1].front().meta.first == 400);
    CHECK(rig.got[2].front().meta.first == 900);
}

TEST_CASE("source/pusher-failure-is-reported-once-and-stops-every-sender") {
    Rig rig(2);
    std::atomic<int> batches{0};
    failpoint::arm("source_push_batch", [&](const failpoint::Site&) { return ++batches == 3 ? EIO : 0; });
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    std::thread rx([&] { rig.receive(); });
    rig.pusher->join();
    rig.chans.clear();  // the receivers see the end of their streams
    rx.join();
    CHECK(rig.errors == 1);
    CHECK(rig.error.find("failpoint source_push_batch: Input/output error (errno 5)") != std::string::npos);
    CHECK(rig.stats.pushed_pages.get() < kPages);
}

TEST_CASE("source/pusher-waits-while-a-demand-request-is-in-service") {
    Rig rig(2);
    Hits yields;
    failpoint::arm("source_push_yield", [&](const failpoint::Site&) { return yields.hit(); });
    rig.gate.enter();  // a request arrived: the senders must not start a batch
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    REQUIRE_MESSAGE(yields.reach(2), "the senders never reached the gate");
    // Both senders are at the gate: nothing was read, framed or sent.
    CHECK(rig.stats.pushed_pages.get() == 0);
    CHECK(rig.stats.push_yields.get() == 2);
    for (int fd : rig.peers) {
        char c;
        CHECK(::recv(fd, &c, 1, MSG_DONTWAIT) == -1);
        CHECK(errno == EAGAIN);
    }
    rig.gate.leave();  // the reply left: the senders go on
    rig.receive();
    rig.pusher->join();
    CHECK(rig.errors == 0);
    rig.check_all_pages_once();
}

TEST_CASE("source/pusher-stop-ends-a-wait-at-the-gate") {
    Rig rig(2);
    Hits yields;
    failpoint::arm("source_push_yield", [&](const failpoint::Site&) { return yields.hit(); });
    rig.gate.enter();
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    REQUIRE_MESSAGE(yields.reach(2), "the senders never reached the gate");
    rig.pusher->stop();
    rig.pusher->join();  // returns: the wait ended, as ECANCELED, which is not an error
    CHECK(rig.errors == 0);
    CHECK(rig.stats.pushed_pages.get() == 0);
    CHECK(rig.gate.shut_down());
}

TEST_CASE("source/pusher-refuses-bad-channel-counts") {
    Rig rig(1);
    auto none = rig.pusher->start({}, [](const Error&) {});
    REQUIRE_FALSE(none.has_value());
    CHECK(none.error().message() == "source: 0 bulk channels (expected 1 to 16)");
}


TEST_CASE("source/pusher-paced-over-pipelined-channels") {
    // Pacing waits on the channel too: it must never overlap a send in flight (the
    // channel's ring would hand the timer's completion to the send: "Timer expired").
    Rig rig(2);
    rig.bandwidth = 400'000'000;  // ~10 ms for these 4 MB
    auto s = rig.start();
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    rig.receive();
    rig.pusher->join();
    CHECK_MESSAGE(rig.errors == 0, rig.error);
    rig.check_all_pages_once();
}
