// The fault thread: blocktime attributed to the faulting thread, and a full outbox that
// neither blocks the thread nor keeps it from stopping.
#include <doctest/doctest.h>
#include <sys/syscall.h>

#include <atomic>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include "src/failpoint.hpp"
#include "tests/flag.hpp"
#include "src/net/outbox.hpp"
#include "src/net/socket.hpp"
#include "tests/pager/helpers.hpp"

using namespace pager_test;
using lazymig::pager::Pager;
using lazymig::pager::ZeroBits;
namespace failpoint = lazymig::failpoint;

namespace {

using lazymig::test::Flag;

struct DisarmOnExit {
    ~DisarmOnExit() { failpoint::disarm_all(); }
};

// An anonymous region with a running fault thread whose requests go to `sockets.peer`.
struct Rig {
    Guest guest{Backing::anon, 64};
    SocketPair sockets;
    SocketChannel channel{sockets.dst};
    lazymig::net::ShutdownEvent stop = *lazymig::net::ShutdownEvent::create();
    lazymig::net::Outbox outbox;
    std::unique_ptr<Pager> pager;
    std::atomic<int> errors{0};

    explicit Rig(std::size_t outbox_bytes = 64 * 1024) : outbox(channel, stop.fd(), outbox_bytes) {
        auto p = Pager::create(std::span(&guest.region(), 1), 1);
        REQUIRE_MESSAGE(p.has_value(), err_of(p));
        pager = std::move(*p);
    }
    void start() {
        auto s = pager->start(outbox, [this](const lazymig::Error& e) {
            ++errors;
            MESSAGE("fault thread failed: ", e.message());
        });
        REQUIRE_MESSAGE(s.has_value(), err_of(s));
    }
    // Places one non-zero page whose every byte is `v`.
    lazymig::Result<std::uint64_t> place(std::uint64_t page, std::uint8_t v) {
        std::vector<std::byte> data(4096, std::byte{v});
        const std::uint8_t nonzero = 0;
        return pager->place(0, page, 1, ZeroBits{std::span(&nonzero, 1)}, data.data(), true);
    }
};

int gettid_() { return static_cast<int>(::syscall(SYS_gettid)); }

}  // namespace

// Two threads fault on distinct pages, A first, then B. B is placed at once; A's placement
// is held (fail point) until B's thread has run on. A's thread both started waiting
// earlier and was released later, so its blocktime is at least B's — by construction,
// not by timing.
TEST_CASE("pager/blocktime-per-faulting-thread") {
    constexpr std::uint64_t kA = 10, kB = 40;
    DisarmOnExit disarm;
    Rig rig;
    if (!rig.pager->blocktime().available) {
        WARN_MESSAGE(false, "skip pager/blocktime-per-faulting-thread: the kernel lacks UFFD_FEATURE_THREAD_ID");
        return;
    }
    rig.start();
    Flag b_done;
    std::atomic<bool> hold_timed_out{false};
    failpoint::arm("pager_before_place_run", [&](const failpoint::Site& s) {
        if (s.first <= kA && kA < s.first + s.count && !b_done.wait_for()) hold_timed_out = true;
        return 0;
    });
    std::atomic<int> tid_a{0}, tid_b{0};
    std::atomic<std::uint8_t> read_a{0}, read_b{0};
    Flag go_a, go_b;
    std::thread ta([&] {
        tid_a = gettid_();
        if (!go_a.wait_for()) return;
        read_a = *reinterpret_cast<volatile std::uint8_t*>(rig.guest.page(kA) + 100);
    });
    std::thread tb([&] {
        tid_b = gettid_();
        if (!go_b.wait_for()) return;
        read_b = *reinterpret_cast<volatile std::uint8_t*>(rig.guest.page(kB) + 200);
        b_done.set();
    });
    while (tid_a == 0 || tid_b == 0) std::this_thread::yield();
    rig.pager->set_vcpu_threads({{.tid = tid_a, .name = "vcpu0"}});

    // A faults; its request is seen; then B faults and its request is seen.
    go_a.set();
    auto ra = rig.sockets.next_request();
    REQUIRE_MESSAGE(ra.has_value(), "no request for page ", kA);
    CHECK(ra->first == kA);
    go_b.set();
    auto rb = rig.sockets.next_request();
    REQUIRE_MESSAGE(rb.has_value(), "no request for page ", kB);
    CHECK(rb->first == kB);

    auto held = std::async(std::launch::async, [&] { return rig.place(kA, 0x5A); });
    auto pb = rig.place(kB, 0xB5);
    REQUIRE_MESSAGE(pb.has_value(), err_of(pb));
    auto pa = held.get();
    REQUIRE_MESSAGE(pa.has_value(), err_of(pa));
    ta.join();
    tb.join();
    CHECK_FALSE(hold_timed_out);
    CHECK(read_a == 0x5A);
    CHECK(read_b == 0xB5);

    const auto bt = rig.pager->blocktime();
    REQUIRE(bt.available);
    REQUIRE(bt.threads.size() == 2);
    const auto& a = bt.threads[0];  // named ones first
    const auto& b = bt.threads[1];
    CHECK(a.tid == tid_a);
    CHECK(a.name == "vcpu0");
    CHECK(a.faults == 1);
    CHECK(b.tid == tid_b);
    CHECK(b.name == "tid " + std::to_string(tid_b.load()));
    CHECK(b.faults == 1);
    CHECK(a.blocktime_ms >= b.blocktime_ms);
    CHECK(a.blocktime_ms > 0);
    CHECK(bt.total_ms == doctest::Approx(a.blocktime_ms + b.blocktime_ms));
    CHECK(bt.untracked_faults == 0);
    const auto hist = rig.pager->fault_latency_buckets();
    std::uint64_t counted = 0;
    for (const auto& h : hist) counted += h.count;
    CHECK(counted == 2);
    rig.pager->stop();
    CHECK(rig.errors == 0);
}

// The peer reads nothing: the socket and the outbox fill, a fault's request gets EAGAIN
// and stays pending in the fault thread, which stops reading faults. It must still stop
// at once; and, in the other run, send the request once the peer drains the socket.
TEST_CASE("pager/full-outbox-does-not-block-the-fault-thread") {
    constexpr std::uint64_t kPage = 7;
    DisarmOnExit disarm;
    Rig rig(256);
    // Fill: frames the peer can parse (page requests for region 99), until no room is left.
    const auto filler = lazymig::proto::encode(lazymig::proto::PageRequest{.region = 99, .count = 1, .first = 0});
    int posted = 0;
    for (;;) {
        auto r = rig.outbox.post(filler);
        if (!r) {
            REQUIRE_MESSAGE(r.error().code == EAGAIN, r.error().message());
            break;
        }
        REQUIRE(++posted < 1'000'000);
    }
    REQUIRE(rig.outbox.pending());
    Flag blocked;
    failpoint::arm("pager_request_blocked", [&](const failpoint::Site&) {
        blocked.set();
        return 0;
    });
    rig.start();
    std::atomic<std::uint8_t> got{0};
    std::thread guest([&] { got = *reinterpret_cast<volatile std::uint8_t*>(rig.guest.page(kPage) + 1); });
    REQUIRE_MESSAGE(blocked.wait_for(), "the fault's request never met a full outbox");

    bool drain = false;
    SUBCASE("stop while blocked") { drain = false; }
    SUBCASE("the peer drains") { drain = true; }
    if (drain) {
        // Every filler, then the fault's request.
        std::optional<lazymig::proto::PageRequest> r;
        for (int i = 0; i <= posted + 64; ++i) {
            r = rig.sockets.next_request();
            if (!r || r->region != 99) break;
        }
        REQUIRE_MESSAGE(r.has_value(), "the pending request never arrived");
        CHECK(r->region == 0);
        CHECK(r->first == kPage);
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto stopped = std::async(std::launch::async, [&] { rig.pager->stop(); });
    const bool prompt = stopped.wait_for(std::chrono::milliseconds(kTimeoutMs)) == std::future_status::ready;
    CHECK_MESSAGE(prompt, "stop() did not return while a request was pending");
    MESSAGE("stop() took ", std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(), " ms");
    auto p = rig.place(kPage, 0x77);  // release the guest thread
    REQUIRE_MESSAGE(p.has_value(), err_of(p));
    guest.join();
    CHECK(got == 0x77);
    CHECK(rig.errors == 0);
    if (!prompt) stopped.wait();
}
