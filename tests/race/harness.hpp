// tests/race/harness.hpp — an in-process Source and Destination over loopback, guest
// threads that may touch pages still in flight, and bounded waits.
//
// Guest threads read and write destination memory through guarded_read/guarded_write:
// a poisoned page (the migration failed after resume) raises SIGBUS, which the guard
// turns into `false` instead of a dead test. That is what lets every wait here be a
// failure detector: on a timeout the test cancels the destination, which poisons what
// never arrived, so every blocked thread returns and is joined.
#pragma once

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "src/failpoint.hpp"
#include "src/net/socket.hpp"
#include "tests/flag.hpp"
#include "tests/tls_key.hpp"

namespace race {

using lazymig::Backing;
inline constexpr std::size_t kPage = 4096;
inline constexpr std::size_t kWords = kPage / 8;
inline constexpr auto kLimit = std::chrono::seconds(60);

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string("(no error)") : r.error().message();
}

// The port of a "tcp:host:port" uri.
inline std::uint16_t port_of(const std::string& uri) {
    auto ep = lazymig::net::parse_uri(uri);
    REQUIRE_MESSAGE(ep.has_value(), err_of(ep));
    return ep->port;
}

// A plain TCP connection to 127.0.0.1:port whose reads give up after 20 s (a failure
// detector: the listener must answer or close it long before).
inline int connect_to(std::uint16_t port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE_MESSAGE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0, std::strerror(errno));
    timeval tv{20, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

// Polls `pred` until it holds or `limit` passes (a state with a deadline, not ordering).
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
}

// The source's contents: a hash of (page, word); every 7th page is zero so zero pages
// travel as bitmap bits too.
inline std::uint64_t content(std::uint64_t page, std::uint64_t word) {
    if (page % 7 == 3) return 0;
    std::uint64_t x = ((page << 9) | word) * 0x9E3779B97F4A7C15ull + 1;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 32);
}
inline void expected_page(std::uint64_t page, std::uint64_t* out) {
    for (std::uint64_t w = 0; w < kWords; ++w) out[w] = content(page, w);
}

namespace detail {
// volatile, and fenced in the guarded accesses below: with a plain pointer the compiler
// drops the store of &env as dead (it is overwritten with nullptr right after the access,
// and nothing it can see reads it in between), so the handler found no jump and the
// "guarded" access died of the SIGBUS.
inline thread_local sigjmp_buf* volatile tl_jmp = nullptr;
inline void on_sigbus(int, siginfo_t*, void*) {
    if (sigjmp_buf* j = tl_jmp) siglongjmp(*j, 1);
    ::signal(SIGBUS, SIG_DFL);  // not a guarded access: return, fault again, die of it
}
}  // namespace detail

// Routes SIGBUS of guarded accesses back to them while it lives.
class SigbusGuard {
public:
    SigbusGuard() {
        struct sigaction sa {};
        sa.sa_sigaction = detail::on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        REQUIRE(::sigaction(SIGBUS, &sa, &old_) == 0);
    }
    ~SigbusGuard() { ::sigaction(SIGBUS, &old_, nullptr); }
    SigbusGuard(const SigbusGuard&) = delete;
    SigbusGuard& operator=(const SigbusGuard&) = delete;

private:
    struct sigaction old_ {};
};

// Copies `n` bytes of guest memory; false if the access raised SIGBUS (a poisoned page).
inline bool guarded_read(void* dst, const void* src, std::size_t n) {
    sigjmp_buf env;
    if (sigsetjmp(env, 1) != 0) {
        detail::tl_jmp = nullptr;
        return false;
    }
    detail::tl_jmp = &env;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    std::memcpy(dst, src, n);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    detail::tl_jmp = nullptr;
    return true;
}
inline bool guarded_write(std::uint64_t* dst, std::uint64_t v) {
    sigjmp_buf env;
    if (sigsetjmp(env, 1) != 0) {
        detail::tl_jmp = nullptr;
        return false;
    }
    detail::tl_jmp = &env;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    *static_cast<volatile std::uint64_t*>(dst) = v;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    detail::tl_jmp = nullptr;
    return true;
}

using lazymig::test::Flag;

// Guest threads. On destruction, threads still running are released with `release`
// (cancel the destination: it poisons missing pages, so blocked faults return) and
// joined: a failing test never leaves one behind.
class Threads {
public:
    explicit Threads(std::function<void()> release) : release_(std::move(release)) {}
    ~Threads() {
        if (!wait_all(std::chrono::seconds(0))) release_();
        for (auto& t : threads_) t.join();
    }
    void spawn(std::function<void()> body) {
        threads_.emplace_back([this, body = std::move(body)] {
            body();
            std::lock_guard lock(mu_);
            ++finished_;
            cv_.notify_all();
        });
    }
    // True when every body returned within `limit`.
    [[nodiscard]] bool wait_all(std::chrono::milliseconds limit = kLimit) {
        std::unique_lock lock(mu_);
        return cv_.wait_for(lock, limit, [&] { return finished_ == threads_.size(); });
    }

private:
    std::function<void()> release_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::size_t finished_ = 0;
    std::vector<std::thread> threads_;
};

// Runs `wait()` with a deadline; on expiry the test fails and the endpoint is cancelled.
template <class Endpoint>
lazymig::Result<void> bounded_wait(Endpoint& e, std::chrono::seconds limit = kLimit) {
    std::promise<lazymig::Result<void>> done;
    auto fut = done.get_future();
    std::thread t([&] { done.set_value(e.wait()); });
    if (fut.wait_for(limit) != std::future_status::ready) {
        FAIL_CHECK("wait() did not return within ", limit.count(), " s; cancelling");
        e.cancel();
    }
    t.join();
    return fut.get();
}

// What each end's wait() returned.
struct Outcome {
    lazymig::Result<void> dst, src;
    [[nodiscard]] bool clean() const { return dst.has_value() && src.has_value(); }
};

// Hook calls, counted.
struct Counts {
    std::atomic<int> dst_pause{0}, dst_resume{0}, src_pause{0}, src_resume{0};
    // The phases each side reported through on_event, in order.
    std::mutex mu;
    std::vector<lazymig::Phase> dst_phases, src_phases;
    std::vector<std::string> dst_why, src_why;  // each phase event's message
    void phase(bool dst, const lazymig::Event& e) {
        std::lock_guard lock(mu);
        (dst ? dst_phases : src_phases).push_back(e.phase);
        (dst ? dst_why : src_why).push_back(e.message);
    }
    std::vector<std::string> why(bool dst) {
        std::lock_guard lock(mu);
        return dst ? dst_why : src_why;
    }
    std::vector<lazymig::Phase> phases(bool dst) {
        std::lock_guard lock(mu);
        return dst ? dst_phases : src_phases;
    }
};

// Deadlines a test shortens (the defaults are the library's).
struct Limits {
    std::chrono::milliseconds handshake{5'000}, switchover{30'000}, heartbeat{2'000};
    std::optional<lazymig::Security> dst_security, src_security;  // default: the test PSK
    std::chrono::milliseconds recover_timeout{60'000};
    bool poison_on_loss = false;
    std::size_t bulk_channels = 0;  // 0: the library's default
    lazymig::Mode mode = lazymig::Mode::postcopy;
    std::uint32_t epoch_ms = 50;  // hybrid back-replication, both sides (0: off)
};

// Source and destination memory of the same shape, and the two endpoints.
class Pair {
public:
    Pair(Backing backing, std::size_t size, lazymig::Parameters source_params = {}, Limits limits = {})
        : size_(size), counts_(std::make_shared<Counts>()) {
        auto s = lazymig::GuestMemory::create("ram0", size, backing, true);
        REQUIRE_MESSAGE(s.has_value(), err_of(s));
        src_mem_ = std::move(*s);
        auto d = lazymig::GuestMemory::create("ram0", size, backing, false);
        REQUIRE_MESSAGE(d.has_value(), err_of(d));
        dst_mem_ = std::move(*d);
        auto* w = reinterpret_cast<std::uint64_t*>(src_mem_.data());
        for (std::uint64_t p = 0; p < pages(); ++p) expected_page(p, w + p * kWords);

        auto c = counts_;
        lazymig::VmmHooks dh{.pause_vcpus = [c] { ++c->dst_pause; }, .resume_vcpus = [c] { ++c->dst_resume; },
                             .save_device_state = {},
                             .load_device_state = [](std::span<const std::byte>) -> lazymig::Result<void> { return {}; },
                             .on_epoch_committed = {}, .on_event = [c](const lazymig::Event& e) {
                                 if (e.kind == lazymig::Event::Kind::phase) c->phase(true, e);
                             }};
        auto sec = testkey::security();
        sec.handshake_timeout = limits.handshake;
        auto dst = lazymig::Destination::listen(
            {.regions = {dst_mem_.region()}, .hooks = dh, .uri = "tcp:127.0.0.1:0",
             .parameters = {.heartbeat_timeout = limits.heartbeat, .recover_timeout = limits.recover_timeout,
                            .epoch_ms = limits.epoch_ms},
             .security = limits.dst_security.value_or(sec), .poison_on_loss = limits.poison_on_loss});
        REQUIRE_MESSAGE(dst.has_value(), err_of(dst));
        dst_ = std::move(*dst);
        lazymig::VmmHooks sh{.pause_vcpus = [c] { ++c->src_pause; }, .resume_vcpus = [c] { ++c->src_resume; },
                             .save_device_state = []() -> lazymig::Result<std::vector<std::byte>> {
                                 return std::vector<std::byte>(64, std::byte{9});
                             },
                             .load_device_state = {}, .on_epoch_committed = {}, .on_event = [c](const lazymig::Event& e) {
                                 if (e.kind == lazymig::Event::Kind::phase) c->phase(false, e);
                             }};
        source_params.heartbeat_timeout = limits.heartbeat;
        source_params.recover_timeout = limits.recover_timeout;
        source_params.epoch_ms = limits.epoch_ms;
        if (limits.bulk_channels) source_params.bulk_channels = static_cast<std::uint32_t>(limits.bulk_channels);
        auto src = lazymig::Source::create({.regions = {src_mem_.region()}, .hooks = sh, .uri = dst_->local_uri(),
                                            .mode = limits.mode, .parameters = source_params,
                                            .connect_timeout = std::chrono::milliseconds(10'000),
                                            .security = limits.src_security.value_or(sec),
                                            .switchover_timeout = limits.switchover});
        REQUIRE_MESSAGE(src.has_value(), err_of(src));
        src_ = std::move(*src);
    }

    void migrate() {
        auto r = src_->migrate();
        REQUIRE_MESSAGE(r.has_value(), err_of(r));
    }
    // Waits for both ends; every page must have arrived at the destination.
    Outcome finish() {
        Outcome o{bounded_wait(*dst_), bounded_wait(*src_)};
        REQUIRE_MESSAGE(dst_->stats().pages_present == pages(), "destination: ", err_of(o.dst));
        return o;
    }
    // Both ends report success and the migrated VM was never paused again.
    void check_clean_end(const Outcome& o) {
        CHECK_MESSAGE(o.dst.has_value(), "destination: ", err_of(o.dst));
        CHECK_MESSAGE(o.src.has_value(), "source: ", err_of(o.src));
        CHECK(dst_->stats().phase == lazymig::Phase::completed);
        CHECK(src_->stats().phase == lazymig::Phase::completed);
        CHECK(counts_->dst_resume == 1);
        CHECK(counts_->dst_pause == 0);
        CHECK(counts_->src_pause == 1);
        CHECK(counts_->src_resume == 0);
    }
    // Stops a migration that hangs: missing pages are poisoned, blocked guest threads return.
    void cancel() { dst_->cancel(); }

    [[nodiscard]] std::uint64_t pages() const { return size_ / kPage; }
    // The source's memory still holds exactly what it was filled with.
    [[nodiscard]] bool source_intact() const {
        std::vector<std::uint64_t> want(kWords);
        for (std::uint64_t p = 0; p < pages(); ++p) {
            expected_page(p, want.data());
            if (std::memcmp(src_mem_.data() + p * kPage, want.data(), kPage) != 0) return false;
        }
        return true;
    }
    // The source's page, for a test that plays the guest writing at the source.
    [[nodiscard]] std::uint64_t* src_page(std::uint64_t p) const {
        return reinterpret_cast<std::uint64_t*>(src_mem_.data() + p * kPage);
    }
    [[nodiscard]] std::uint64_t* dst_page(std::uint64_t p) const {
        return reinterpret_cast<std::uint64_t*>(dst_mem_.data() + p * kPage);
    }
    [[nodiscard]] lazymig::Destination& dst() { return *dst_; }
    [[nodiscard]] lazymig::Source& src() { return *src_; }
    [[nodiscard]] Counts& counts() { return *counts_; }

    // Pages whose bytes differ from the source's (a poisoned page counts as differing).
    [[nodiscard]] std::uint64_t pages_differing_from_source() const {
        std::vector<std::byte> got(kPage);
        std::uint64_t bad = 0;
        for (std::uint64_t p = 0; p < pages(); ++p)
            bad += !guarded_read(got.data(), dst_page(p), kPage) ||
                   std::memcmp(src_mem_.data() + p * kPage, got.data(), kPage) != 0;
        return bad;
    }

private:
    std::size_t size_;
    std::shared_ptr<Counts> counts_;
    lazymig::GuestMemory src_mem_, dst_mem_;  // declared before the endpoints: they outlive them
    std::unique_ptr<lazymig::Destination> dst_;
    std::unique_ptr<lazymig::Source> src_;
};

// Holds the source's pusher (failpoint source_push_batch) at its first batch until
// release(): no page is pushed before that, whatever the machine's speed, so the pages a
// test touches meanwhile can only come by demand. Every later batch passes. The hold
// is a failure detector too: after kLimit it gives up and the batch goes on.
// Declare it after the Pair: it is then destroyed first and lets a held pusher go
// before the endpoints join it.
class PusherHold {
public:
    PusherHold() : s_(std::make_shared<State>()) {
        lazymig::failpoint::arm("source_push_batch", [s = s_](const lazymig::failpoint::Site&) {
            ++s->hits;
            if (!s->release.is_set()) {
                s->held.set();
                if (!s->release.wait_for()) s->timed_out = true;
            }
            return 0;
        });
    }
    ~PusherHold() {
        s_->release.set();
        lazymig::failpoint::disarm_all();
    }
    PusherHold(const PusherHold&) = delete;
    PusherHold& operator=(const PusherHold&) = delete;

    // True once the pusher is blocked at its first batch.
    [[nodiscard]] bool wait_held() { return s_->held.wait_for(); }
    void release() { s_->release.set(); }
    [[nodiscard]] int hits() const { return s_->hits; }
    [[nodiscard]] bool timed_out() const { return s_->timed_out; }

private:
    // Shared with the armed action, which a pusher thread may still be running.
    struct State {
        Flag held, release;
        std::atomic<int> hits{0};
        std::atomic<bool> timed_out{false};
    };
    std::shared_ptr<State> s_;
};

inline Backing pick_backing() {
    Backing b = Backing::anon;
    SUBCASE("anon") { b = Backing::anon; }
    SUBCASE("memfd") { b = Backing::memfd; }
    return b;
}

}  // namespace race
