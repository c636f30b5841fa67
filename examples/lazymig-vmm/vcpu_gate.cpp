#include "vcpu_gate.hpp"

namespace vmm {

void VcpuGate::add_vcpus(unsigned n) {
    std::lock_guard lock(mu_);
    live_ += n;
}

void VcpuGate::pause(PauseReason reason) {
    std::unique_lock lock(mu_);
    flags_.fetch_or(static_cast<std::uint32_t>(reason), std::memory_order_acq_rel);
    vcpu_cv_.notify_all();  // halted vCPUs wake and park
    ctl_cv_.wait(lock, [&] { return parked_ == live_; });
}

void VcpuGate::resume(PauseReason reason) {
    std::lock_guard lock(mu_);
    flags_.fetch_and(~static_cast<std::uint32_t>(reason), std::memory_order_acq_rel);
    vcpu_cv_.notify_all();
}

void VcpuGate::stop() {
    std::lock_guard lock(mu_);
    flags_.fetch_or(kStop, std::memory_order_acq_rel);
    vcpu_cv_.notify_all();
    ctl_cv_.notify_all();
}

void VcpuGate::interrupt(const std::function<void()>& deliver) {
    std::lock_guard lock(mu_);
    deliver();
    vcpu_cv_.notify_all();
}

void VcpuGate::vcpu_exited() {
    std::lock_guard lock(mu_);
    --live_;
    ctl_cv_.notify_all();
}

bool VcpuGate::park() {
    std::unique_lock lock(mu_);
    return park_locked(lock);
}

// The parked count changes only under the lock, and pause() reads it under the lock:
// everything the vCPU wrote before parking happens-before the controller's reads.
bool VcpuGate::park_locked(std::unique_lock<std::mutex>& lock) {
    auto flags = [&] { return flags_.load(std::memory_order_acquire); };
    if (flags() & kStop) return false;
    if (flags() == 0) return true;
    ++parked_;
    ctl_cv_.notify_all();
    vcpu_cv_.wait(lock, [&] { return flags() == 0 || (flags() & kStop); });
    --parked_;
    return (flags() & kStop) == 0;
}

bool VcpuGate::idle_until(Clock::time_point deadline) {
    std::unique_lock lock(mu_);
    vcpu_cv_.wait_until(lock, deadline, [&] { return flags_.load(std::memory_order_acquire) != 0; });
    return park_locked(lock);
}

bool VcpuGate::wait_work(const std::function<bool()>& try_take) {
    std::unique_lock lock(mu_);
    for (;;) {
        if (!park_locked(lock)) return false;
        if (try_take()) return true;
        vcpu_cv_.wait(lock);  // woken by interrupt(), pause() or stop(); re-checked above
    }
}

}  // namespace vmm
