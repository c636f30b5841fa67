// guest_lock.hpp — a spinlock whose word lives in guest RAM (0 free, 1 held).
//
// A vCPU never parks while it holds one (safe points lie between guest operations),
// so a waiter normally gets the lock within the holder's few stores. Waiting still
// gives up when the gate asks the vCPUs to stop running: the holder may be a vCPU that
// will never release it — stopped by a poisoned page after a failed migration — and
// a spinning vCPU could never reach its safe point, so pause_vcpus would never return.
// The caller then drops the locks it holds (it has written nothing yet), parks and
// retries. With no gate (tests) the wait never gives up.
#pragma once

#include <sched.h>

#include <atomic>
#include <cstdint>

#include "../vcpu_gate.hpp"

namespace vmm {

[[nodiscard]] inline bool guest_lock(std::uint32_t& word, const VcpuGate* gate) noexcept {
    std::atomic_ref<std::uint32_t> w(word);
    for (unsigned spins = 0;; ++spins) {
        std::uint32_t expected = 0;
        if (w.compare_exchange_weak(expected, 1, std::memory_order_acquire, std::memory_order_relaxed)) return true;
        if (spins % 64 != 63) {
            __builtin_ia32_pause();
            continue;
        }
        if (gate && !gate->running()) return false;
        ::sched_yield();  // two cores: let the holder (a vCPU thread) run
    }
}

inline void guest_unlock(std::uint32_t& word) noexcept {
    std::atomic_ref<std::uint32_t>(word).store(0, std::memory_order_release);
}

}  // namespace vmm
