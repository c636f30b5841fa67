// vcpu_gate.hpp — where vCPU threads park, and how the VMM parks them.
//
// A vCPU thread calls safe_point() between guest operations; while any pause reason is
// set it parks there. pause(reason) returns only when every live vCPU is parked (or
// halted, which is a safe point too), so the caller then owns guest RAM and the vCPU
// registers until resume(reason). Reasons are independent: the VM runs only when none
// is set, so a user `stop`, a migration and a checker can overlap.
//
//   vCPU thread:                          control thread (QMP, lazymig hooks):
//     while (gate.safe_point()) step();     gate.pause(Reason::check);  // all parked
//                                           ... read RAM and registers ...
//                                           gate.resume(Reason::check);
//
// Halting (idle_until, wait_work) blocks on the same condition variable as parking, so
// a halted vCPU wakes for a pause, a stop or its own event. Nothing here sleeps.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>

namespace vmm {

enum class PauseReason : std::uint32_t {
    user = 1u << 0,       // QMP stop/cont
    migration = 1u << 1,  // lazymig's pause_vcpus/resume_vcpus; set at start on --incoming
    check = 1u << 2,      // a workload checker wants a consistent snapshot
    migrated = 1u << 3,   // the VM now runs elsewhere; never cleared
};

class VcpuGate {
public:
    using Clock = std::chrono::steady_clock;

    explicit VcpuGate(std::uint32_t initial_reasons = 0) : flags_(initial_reasons) {}

    // --- control side (any thread but a vCPU's) ---
    // Counts vCPU threads before they are spawned, so pause() waits for them too.
    void add_vcpus(unsigned n);
    // Sets `reason`; returns when every live vCPU is parked.
    void pause(PauseReason reason);
    void resume(PauseReason reason);
    // Makes every vCPU leave its loop (safe_point and the waits return false).
    void stop();
    [[nodiscard]] bool running() const noexcept { return flags_.load(std::memory_order_acquire) == 0; }
    [[nodiscard]] std::uint32_t reasons() const noexcept {
        return flags_.load(std::memory_order_acquire) & ~kStop;
    }
    // Runs `deliver` under the gate's lock and wakes halted vCPUs: how a device hands
    // a vCPU work that wait_work() then takes under the same lock.
    void interrupt(const std::function<void()>& deliver);

    // --- vCPU side ---
    // Parks while paused. False: the vCPU must return (the VM is stopping).
    [[nodiscard]] bool safe_point() {
        if (flags_.load(std::memory_order_acquire) == 0) return true;
        return park();
    }
    // Halts until `deadline` (a guest timer), a pause (parks first) or a stop.
    [[nodiscard]] bool idle_until(Clock::time_point deadline);
    // Halts until `try_take` (called under the gate's lock) returns true while running.
    [[nodiscard]] bool wait_work(const std::function<bool()>& try_take);
    // Called by a vCPU thread as it exits.
    void vcpu_exited();

private:
    static constexpr std::uint32_t kStop = 1u << 31;
    bool park();
    bool park_locked(std::unique_lock<std::mutex>& lock);

    std::atomic<std::uint32_t> flags_;
    std::mutex mu_;
    std::condition_variable vcpu_cv_;  // vCPUs wait here (parked or halted)
    std::condition_variable ctl_cv_;   // pause() waits here for parked_ == live_
    unsigned live_ = 0;
    unsigned parked_ = 0;
};

}  // namespace vmm
