// Blocktime per faulting thread; see blocktime.hpp.
//
// The one race that matters: the fault thread publishes a wait on page P while a placer
// makes P present. Fault thread: store waiting, waiters++ (seq_cst), then load P's state.
// Placer: store P PRESENT (seq_cst), then load waiters and the slots. In any interleaving
// at least one of them sees the other; the wait is ended by whichever wins the CAS of
// `waiting` back to 0, so it is counted once.
#include "pager/blocktime.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "src/log.hpp"

namespace lazymig::pager {

Blocktime::Blocktime(bool available)
    : available_(available), slots_(available ? std::make_unique<Slot[]>(kNamedSlots + kUnnamedSlots) : nullptr) {}

void Blocktime::set_names(std::vector<VcpuThread> threads) {
    if (threads.size() > kNamedSlots) {
        LZ_LOG(warn, "pager_blocktime_names", "named={} kept={}", threads.size(), kNamedSlots);
        threads.resize(kNamedSlots);
    }
    std::lock_guard lock(names_mu_);
    names_ = std::move(threads);
}

int Blocktime::slot_of(std::uint32_t tid) {
    if (auto it = by_tid_.find(tid); it != by_tid_.end()) return it->second;
    bool named = false;
    {
        std::lock_guard lock(names_mu_);
        named = std::any_of(names_.begin(), names_.end(), [&](const VcpuThread& v) { return v.tid == int(tid); });
    }
    if (named ? named_ >= kNamedSlots : unnamed_ >= kUnnamedSlots) {
        if (!warned_) {
            warned_ = true;
            LZ_LOG(warn, "pager_blocktime_table_full", "tid={} unnamed_slots={}: its waits are not measured", tid,
                   kUnnamedSlots);
        }
        return -1;
    }
    (named ? named_ : unnamed_)++;
    const std::size_t i = used_.load(std::memory_order_relaxed);
    slots_[i].tid.store(tid, std::memory_order_relaxed);
    used_.store(i + 1, std::memory_order_release);  // the slot's tid is visible first
    by_tid_.emplace(tid, static_cast<int>(i));
    return static_cast<int>(i);
}

int Blocktime::begin(std::uint32_t tid, std::uint32_t ri, std::uint64_t page, std::uint32_t now_us) {
    if (!available_) return -1;
    const int i = slot_of(tid);
    if (i < 0) {
        untracked_.fetch_add(1, std::memory_order_relaxed);
        return -1;
    }
    Slot& s = slots_[i];
    s.faults.fetch_add(1, std::memory_order_relaxed);
    const std::uint64_t k = key(ri, page);
    if (const std::uint64_t old = s.waiting.load(std::memory_order_acquire); old == k) {
        return i;  // the same wait, faulted again (a signal interrupted it): it goes on
    } else if (old != 0) {
        // The thread runs again, so its previous wait ended without its page arriving
        // (e.g. poisoned); count it up to this fault, the latest moment it can have ended.
        end(s, old, now_us);
    }
    s.since_us.store(now_us, std::memory_order_relaxed);
    s.waiting.store(k, std::memory_order_seq_cst);
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    return i;
}

void Blocktime::recheck(int slot, std::uint32_t ri, std::uint64_t page, bool present, std::uint32_t now_us) {
    if (slot < 0 || !present) return;
    end(slots_[slot], key(ri, page), now_us);
}

void Blocktime::end(Slot& s, std::uint64_t expected, std::uint32_t now_us) {
    if (!s.waiting.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) return;
    waiters_.fetch_sub(1, std::memory_order_relaxed);
    // A placement timed just before a fault was read (the fault saw it in flight)
    // waited for nothing: zero, never a wrapped 2^32.
    const auto waited = static_cast<std::int32_t>(now_us - s.since_us.load(std::memory_order_relaxed));
    if (waited > 0) s.blocked_us.fetch_add(static_cast<std::uint64_t>(waited), std::memory_order_relaxed);
}

void Blocktime::placed(std::uint32_t ri, std::uint64_t first, std::uint64_t count, std::uint32_t now_us) {
    if (!available_) return;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_seq_cst) <= 0) return;
    const std::uint64_t lo = key(ri, first), hi = key(ri, first + count);
    const std::size_t used = used_.load(std::memory_order_acquire);
    for (std::size_t i = 0; i < used; ++i) {
        const std::uint64_t w = slots_[i].waiting.load(std::memory_order_seq_cst);
        if (w >= lo && w < hi) end(slots_[i], w, now_us);
    }
}

BlocktimeReport Blocktime::report() const {
    BlocktimeReport r;
    r.available = available_;
    if (!available_) return r;
    r.untracked_faults = untracked_.load(std::memory_order_relaxed);
    std::vector<VcpuThread> names;
    {
        std::lock_guard lock(names_mu_);
        names = names_;
    }
    const std::size_t used = used_.load(std::memory_order_acquire);
    std::vector<bool> taken(used, false);
    auto entry = [&](std::size_t i, std::string name) {
        const Slot& s = slots_[i];
        const double ms = static_cast<double>(s.blocked_us.load(std::memory_order_relaxed)) / 1000.0;
        r.total_ms += ms;
        return VcpuBlocktime{.tid = int(s.tid.load(std::memory_order_relaxed)), .name = std::move(name),
                             .faults = s.faults.load(std::memory_order_relaxed), .blocktime_ms = ms};
    };
    for (const auto& v : names) {  // every named vCPU, in the VMM's order, faulted or not
        std::size_t i = 0;
        while (i < used && slots_[i].tid.load(std::memory_order_relaxed) != std::uint32_t(v.tid)) ++i;
        if (i < used) {
            taken[i] = true;
            r.threads.push_back(entry(i, v.name));
        } else {
            r.threads.push_back(VcpuBlocktime{.tid = v.tid, .name = v.name, .faults = 0, .blocktime_ms = 0});
        }
    }
    const std::size_t named = r.threads.size();
    for (std::size_t i = 0; i < used; ++i)
        if (!taken[i]) r.threads.push_back(entry(i, fmt::format("tid {}", slots_[i].tid.load(std::memory_order_relaxed))));
    std::sort(r.threads.begin() + static_cast<std::ptrdiff_t>(named), r.threads.end(),
              [](const VcpuBlocktime& a, const VcpuBlocktime& b) { return a.tid < b.tid; });
    return r;
}

}  // namespace lazymig::pager
