// Helpers shared by the workloads.
#include "workloads.hpp"

namespace vmm {

Share vcpu_share(std::size_t pages, std::uint32_t vcpus, unsigned id) noexcept {
    const std::size_t usable = pages > 1 ? pages - 1 : 0;  // page 0 is the boot header
    const std::size_t lo = usable * id / vcpus, hi = usable * (id + 1) / vcpus;
    return {1 + lo, hi - lo};
}

nlohmann::json OpsMeter::status(std::string_view unit) const {
    const auto now = std::chrono::steady_clock::now();
    const std::uint64_t ops = ops_.load(std::memory_order_relaxed);
    std::lock_guard lock(mu_);
    const double dt = std::chrono::duration<double>(now - last_).count();
    // Refresh the rate at most a few times a second so that two quick queries agree.
    if (dt >= 0.25) {
        last_rate_ = static_cast<double>(ops - last_ops_) / dt;
        last_ops_ = ops;
        last_ = now;
    }
    return {{"operations", ops}, {"rate", last_rate_}, {"rate-unit", unit}};
}

}  // namespace vmm
