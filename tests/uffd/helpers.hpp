// tests/uffd/helpers.hpp — mappings, worker threads and event waits for the uffd tests.
//
// Waits use poll with kTimeoutMs as a failure detector only; nothing sleeps to
// synchronise. Declare a test's Mappings first, then its Uffd, then its Workers: they
// are destroyed in reverse, so a failing test releases blocked threads (closing the
// uffd resolves their faults and events) before joining them and unmapping.
#pragma once

#include <doctest/doctest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "uffd/uffd.hpp"

namespace uffd_test {

using lazymig::uffd::Event;
using lazymig::uffd::IoctlOutcome;
using lazymig::uffd::Uffd;

inline const std::size_t kPage = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
inline constexpr int kTimeoutMs = 10'000;

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string() : r.error().message();
}

inline std::uint64_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

inline std::string hex(std::uint64_t v) {
    char b[32];
    std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
    return b;
}

// Bytes no page starts with by accident: seed, seed+7, seed+14, ...
inline std::vector<char> pattern(std::size_t len, int seed) {
    std::vector<char> v(len);
    for (std::size_t i = 0; i < len; ++i) v[i] = static_cast<char>(seed + 7 * i);
    return v;
}

// A mapping unmapped on destruction; small anonymous ones are kept off THP.
class Mapping {
public:
    static Mapping anon(std::size_t pages, int prot = PROT_READ | PROT_WRITE) {
        Mapping m(::mmap(nullptr, pages * kPage, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                  pages * kPage);
        REQUIRE(m.p_ != MAP_FAILED);
        ::madvise(m.p_, m.len_, MADV_NOHUGEPAGE);
        return m;
    }
    static Mapping shared(int fd, std::size_t pages) {
        Mapping m(::mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0),
                  pages * kPage);
        REQUIRE(m.p_ != MAP_FAILED);
        return m;
    }
    Mapping(Mapping&& o) noexcept : p_(std::exchange(o.p_, MAP_FAILED)), len_(o.len_) {}
    Mapping& operator=(Mapping&&) = delete;
    ~Mapping() {
        if (p_ != MAP_FAILED) ::munmap(p_, len_);
    }
    [[nodiscard]] char* page(std::size_t i) const { return static_cast<char*>(p_) + i * kPage; }
    [[nodiscard]] std::size_t len() const { return len_; }
    // The test unmapped or moved it itself.
    void release() { p_ = MAP_FAILED; }

private:
    Mapping(void* p, std::size_t len) : p_(p), len_(len) {}
    void* p_;
    std::size_t len_;
};

// Threads that signal an eventfd when their body returns.
class Workers {
public:
    explicit Workers(Uffd& u) : u_(u), done_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
        REQUIRE(done_ >= 0);
    }
    Workers(const Workers&) = delete;
    Workers& operator=(const Workers&) = delete;
    ~Workers() {
        if (!poll_finished()) u_.close();  // a failed test: release blocked faults and events
        join();
        ::close(done_);
    }

    void spawn(std::function<void()> body) {
        ++spawned_;
        threads_.emplace_back([this, body = std::move(body)] {
            body();
            const std::uint64_t one = 1;
            (void)!::write(done_, &one, sizeof one);
        });
    }

    [[nodiscard]] int done_fd() const { return done_; }

    // Collects finish signals without blocking; true when every body has returned.
    bool poll_finished() {
        std::uint64_t n = 0;
        if (::read(done_, &n, sizeof n) == sizeof n) finished_ += n;
        return finished_ == spawned_;
    }

    // Waits up to timeout_ms for every body; on timeout closes the uffd so blocked threads
    // go on, joins, and returns false.
    [[nodiscard]] bool wait_all(int timeout_ms = kTimeoutMs) {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
        while (!poll_finished()) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            pollfd p{done_, POLLIN, 0};
            if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) == 0) {
                u_.close();
                join();
                return false;
            }
        }
        join();
        return true;
    }

private:
    void join() {
        for (auto& t : threads_)
            if (t.joinable()) t.join();
    }
    Uffd& u_;
    int done_;
    std::size_t spawned_ = 0;
    std::uint64_t finished_ = 0;
    std::vector<std::thread> threads_;
};

inline bool wait_readable(int fd, int timeout_ms = kTimeoutMs) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

// The next message, or nullopt when none arrives within the timeout.
// A uffd with `features`, with `area` registered for MISSING faults.
inline Uffd open_registered(std::uint64_t features, const Mapping& area) {
    auto u = Uffd::open(features);
    REQUIRE_MESSAGE(u.has_value(), err_of(u));
    auto r = u->register_range(area.page(0), area.len(), UFFDIO_REGISTER_MODE_MISSING);
    REQUIRE_MESSAGE(r.has_value(), err_of(r));
    return std::move(*u);
}

inline std::optional<Event> next_event(Uffd& u, int timeout_ms = kTimeoutMs) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (std::chrono::steady_clock::now() < deadline) {
        if (!wait_readable(u.fd(), timeout_ms)) return std::nullopt;
        Event ev;
        auto n = u.read_events({&ev, 1});
        REQUIRE_MESSAGE(n.has_value(), err_of(n));
        if (*n == 1) return ev;  // 0: a fault queued at poll time was woken meanwhile
    }
    return std::nullopt;
}

}  // namespace uffd_test
