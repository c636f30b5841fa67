// pager/blocktime.hpp — how long each guest thread waited for pages (QEMU's postcopy
// blocktime, migration/postcopy-ram.c), attributed by the faulting thread's id.
//
// Like QEMU, one record per thread: the page it waits on and since when. A wait starts
// when the fault thread reads the fault (begin) and ends when the page becomes present
// (placed, on the placing thread) — several threads may wait on one page, and each
// one's wait ends with that page. The thread comes from the uffd message
// (UFFD_FEATURE_THREAD_ID); without that feature nothing is attributed and report()
// says so (available = false), never a guess.
//
// Bounded: slots for the VMM's named vCPU threads (at most kNamedSlots) plus kUnnamedSlots
// for other threads, assigned at a thread's first fault. Faults of further unnamed
// threads are counted in untracked_faults and their waits are not measured (a warning is
// logged once).
//
// Threads: begin()/recheck() on the fault thread only; placed() on any placing thread;
// set_names() and report() on any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lazymig/lazymig.hpp"

namespace lazymig::pager {

struct BlocktimeReport {
    bool available = false;             // the uffd reports thread ids (THREAD_ID)
    double total_ms = 0;                // sum over every tracked thread's finished waits
    std::vector<VcpuBlocktime> threads; // named ones first (in the VMM's order), then by tid
    std::uint64_t untracked_faults = 0; // faults of threads past the table: not measured
};

class Blocktime {
public:
    static constexpr std::size_t kNamedSlots = 1024;  // KVM's usual KVM_MAX_VCPUS
    static constexpr std::size_t kUnnamedSlots = 64;

    explicit Blocktime(bool available);

    // Replaces the VMM's list of named vCPU threads (any thread, any time).
    void set_names(std::vector<VcpuThread> threads);

    // A fault of thread `tid` on `page` of region `ri`, read at `now_us`. Returns the
    // slot now waiting, or -1 (not available, or the table is full).
    int begin(std::uint32_t tid, std::uint32_t ri, std::uint64_t page, std::uint32_t now_us);
    // After begin(): the page may have become present before the wait was published; the
    // fault thread then ends the wait itself. `present` is the page state read after begin().
    void recheck(int slot, std::uint32_t ri, std::uint64_t page, bool present, std::uint32_t now_us);
    // Pages [first, first+count) of region `ri` became present at `now_us`: ends every
    // wait on them. REQUIRES: their states were set PRESENT (seq_cst) before this call.
    void placed(std::uint32_t ri, std::uint64_t first, std::uint64_t count, std::uint32_t now_us);

    [[nodiscard]] BlocktimeReport report() const;
    [[nodiscard]] std::size_t bytes() const { return (kNamedSlots + kUnnamedSlots) * sizeof(Slot); }

private:
    struct Slot {
        std::atomic<std::uint32_t> tid{0};
        std::atomic<std::uint32_t> since_us{0};
        std::atomic<std::uint64_t> waiting{0};  // key(ri, page); 0 = not waiting
        std::atomic<std::uint64_t> faults{0};
        std::atomic<std::uint64_t> blocked_us{0};
    };
    static std::uint64_t key(std::uint32_t ri, std::uint64_t page) { return (std::uint64_t(ri) + 1) << 48 | page; }
    void end(Slot& s, std::uint64_t expected, std::uint32_t now_us);
    int slot_of(std::uint32_t tid);

    const bool available_;
    std::unique_ptr<Slot[]> slots_;
    std::atomic<std::size_t> used_{0};     // slots_[0, used_) have a tid
    std::atomic<std::int64_t> waiters_{0}; // slots with a wait in progress
    std::atomic<std::uint64_t> untracked_{0};
    // Fault thread only.
    std::unordered_map<std::uint32_t, int> by_tid_;
    std::size_t unnamed_ = 0, named_ = 0;
    bool warned_ = false;
    mutable std::mutex names_mu_;
    std::vector<VcpuThread> names_;
};

}  // namespace lazymig::pager
