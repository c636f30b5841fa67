#include "workload.hpp"

#include <algorithm>

#include "workloads/workloads.hpp"

namespace vmm {

std::string_view to_string(DirtyPattern p) noexcept {
    switch (p) {
    case DirtyPattern::seq: return "seq";
    case DirtyPattern::random: return "random";
    case DirtyPattern::zipf: return "zipf";
    case DirtyPattern::invalid: break;
    }
    return "invalid";
}

std::unique_ptr<Workload> make_workload(const WorkloadConfig& cfg) {
    switch (cfg.kind) {
    case WorkloadKind::pattern: return std::make_unique<PatternWorkload>(cfg);
    case WorkloadKind::bank: return std::make_unique<BankWorkload>(cfg);
    case WorkloadKind::kv: return std::make_unique<KvWorkload>(cfg);
    case WorkloadKind::idle: return std::make_unique<IdleWorkload>(cfg);
    case WorkloadKind::dirty: return std::make_unique<DirtyWorkload>(cfg);
    case WorkloadKind::invalid: break;
    }
    return nullptr;
}

Pacer::Pacer(double ops_per_s) {
    if (ops_per_s <= 0) return;
    // At most ~250 halts a second: batch the operations of each 4 ms (two cores are
    // shared by both VMs and the migration; a timer wake-up per millisecond per vCPU
    // costs more than the pacing is worth).
    batch_ = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(ops_per_s / 250));
    period_ = std::chrono::duration_cast<VcpuGate::Clock::duration>(
        std::chrono::duration<double>(static_cast<double>(batch_) / ops_per_s));
    next_ = VcpuGate::Clock::now();
}

bool Pacer::tick(VcpuGate& gate) {
    if (period_ == VcpuGate::Clock::duration::zero() || ++done_ < batch_) return gate.safe_point();
    done_ = 0;
    next_ += period_;
    const auto now = VcpuGate::Clock::now();
    // After a pause (or a slow fault) do not burst to catch up: keep the rate, not the debt.
    if (next_ + 10 * period_ < now) next_ = now;
    if (next_ <= now) return gate.safe_point();
    return gate.idle_until(next_);
}

}  // namespace vmm
