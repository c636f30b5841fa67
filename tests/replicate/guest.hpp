// tests/replicate/guest.hpp — a checkable guest and a hybrid migration in one process.
//
// The guest is one "vCPU" thread writing slot after slot: write i (i = 0, 1, 2...) puts
// i + 1 into slot i mod S, where slot s is word (s / P) % 512 of page s % P (P pages),
// so consecutive writes land on different pages. Its whole state is the counter N of
// writes done, which save_device_state returns and load_device_state sets. Memory and N
// form a consistent image exactly when every slot holds what the first N writes left
// there (consistent()): a stale page, a lost write or a torn epoch shows.
//
// The same Guest runs on the source before switchover (its writes make pages stale, so
// there is a post-copy to replicate) and on the destination after resume.
#pragma once

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "tests/race/harness.hpp"

namespace replicate {

using race::kPage;
using race::kWords;

class Guest {
public:
    // `cold` pages after the working set are written too (word 0, outside every slot):
    // the source's guest uses them to make pages stale during pre-copy.
    Guest(std::byte* mem, std::size_t pages, std::size_t cold = 0)
        : mem_(reinterpret_cast<std::uint64_t*>(mem)), pages_(pages), cold_(cold) {}
    ~Guest() { stop(); }
    Guest(const Guest&) = delete;
    Guest& operator=(const Guest&) = delete;

    [[nodiscard]] std::uint64_t slots() const { return pages_ * kWords; }
    std::uint64_t* slot(std::uint64_t s) const { return mem_ + (s % pages_) * kWords + (s / pages_) % kWords; }

    // The vCPU thread starts parked; resume() lets it run.
    void start() {
        thread_ = std::thread([this] { run(); });
    }
    void stop() {
        {
            std::lock_guard lock(mu_);
            stop_ = true;
            pause_ = false;
        }
        cv_.notify_all();
        if (thread_.joinable()) thread_.join();
    }
    // Returns once the thread is parked (or dead of a poisoned page); bounded.
    void pause() {
        std::unique_lock lock(mu_);
        pause_ = true;
        ++pauses_;
        CHECK_MESSAGE(cv_.wait_for(lock, std::chrono::seconds(30), [&] { return parked_ || dead_ || !thread_.joinable(); }),
                      "the guest did not park within 30 s");
    }
    void resume() {
        {
            std::lock_guard lock(mu_);
            pause_ = false;
            ++resumes_;
        }
        cv_.notify_all();
    }
    [[nodiscard]] std::uint64_t count() const { return n_.load(std::memory_order_acquire); }
    void set_count(std::uint64_t n) { n_.store(n, std::memory_order_release); }
    [[nodiscard]] int pauses() const { return pauses_; }
    [[nodiscard]] int resumes() const { return resumes_; }
    [[nodiscard]] bool dead() const { return dead_; }

    // save_device_state / load_device_state: the counter as 8 bytes.
    [[nodiscard]] std::vector<std::byte> state() const {
        std::vector<std::byte> b(8);
        const std::uint64_t n = count();
        std::memcpy(b.data(), &n, 8);
        return b;
    }
    static std::uint64_t count_of(std::span<const std::byte> b) {
        std::uint64_t n = 0;
        if (b.size() == 8) std::memcpy(&n, b.data(), 8);
        return n;
    }

    // Memory `mem` of `pages` pages holds exactly what the first `n` writes left.
    static std::uint64_t inconsistent_slots(const std::byte* mem, std::size_t pages, std::uint64_t n) {
        const auto* w = reinterpret_cast<const std::uint64_t*>(mem);
        const std::uint64_t S = pages * kWords;
        std::uint64_t bad = 0;
        for (std::uint64_t s = 0; s < S; ++s) {
            const std::uint64_t want = n > s ? s + (n - 1 - s) / S * S + 1 : 0;
            const std::uint64_t got = w[(s % pages) * kWords + (s / pages) % kWords];
            bad += got != want;
        }
        return bad;
    }

private:
    void run() {
        race::SigbusGuard guard;
        for (;;) {
            {
                std::unique_lock lock(mu_);
                if (pause_) {
                    parked_ = true;
                    cv_.notify_all();
                    cv_.wait(lock, [&] { return !pause_ || stop_; });
                    parked_ = false;
                }
                if (stop_) return;
            }
            // A batch of writes between looks at the gate; each write is done before the
            // counter counts it, so a parked guest's counter matches memory.
            for (int k = 0; k < 64; ++k) {
                const std::uint64_t i = n_.load(std::memory_order_relaxed);
                if (!race::guarded_write(slot(i % slots()), i + 1)) {
                    std::lock_guard lock(mu_);
                    dead_ = true;  // a poisoned page: the VM is stopped
                    cv_.notify_all();
                    return;
                }
                n_.store(i + 1, std::memory_order_release);
                if (cold_) mem_[(pages_ + i % cold_) * kWords] = i;
            }
            std::this_thread::yield();  // three helpers share two cores
        }
    }

    std::uint64_t* mem_;
    std::size_t pages_, cold_;
    std::atomic<std::uint64_t> n_{0};
    std::mutex mu_;
    std::condition_variable cv_;
    bool pause_ = true, parked_ = false, stop_ = false, dead_ = false;
    int pauses_ = 0, resumes_ = 0;
    std::thread thread_;
};

}  // namespace replicate
