// workload.hpp — what the vCPUs run, and how to tell afterwards that it ran correctly.
//
// A workload keeps all of its data in guest RAM (that is what migrates) and its
// per-vCPU registers in VcpuRegs (the device state). Call order, owned by Vm:
//   source:      boot() → start_devices() → run_vcpu() on each vCPU thread
//   destination: start_devices() → run_vcpu() (parked until the device state is loaded)
//   both:        check() whenever the vCPUs are parked; stop_devices() before exit
#pragma once

#include <functional>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "guest_layout.hpp"
#include "lazymig/error.hpp"
#include "vcpu_gate.hpp"

namespace vmm {

enum class DirtyPattern : std::uint32_t { invalid = 0, seq, random, zipf };
[[nodiscard]] std::string_view to_string(DirtyPattern) noexcept;

struct WorkloadConfig {
    WorkloadKind kind = WorkloadKind::pattern;
    std::uint32_t vcpus = 2;
    double rate = 0;                  // operations (pages, transfers) per second, whole VM; 0 = unpaced
    DirtyPattern pattern = DirtyPattern::seq;
    std::uint32_t working_set_pct = 100;
    std::uint16_t kv_port = 0;        // 0: the kernel picks
};

class Workload {
public:
    virtual ~Workload() = default;
    [[nodiscard]] virtual WorkloadKind kind() const noexcept = 0;
    // Fresh boot (source only): lays out guest RAM and sets each vCPU's registers.
    virtual void boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) = 0;
    // A vCPU thread's life: guest operations between safe points until the gate stops it.
    virtual void run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) = 0;
    // REQUIRES: every vCPU parked (RAM and registers are one consistent snapshot).
    [[nodiscard]] virtual CheckResult check(const GuestView& ram, std::span<const VcpuRegs> regs) const = 0;
    // Figures for query-status; safe while vCPUs run.
    [[nodiscard]] virtual nlohmann::json status() const { return nlohmann::json::object(); }
    // The TCP port of the workload's service, if it has one (kv).
    [[nodiscard]] virtual std::optional<std::uint16_t> service_port() const { return std::nullopt; }

    // Devices the workload drives (kv: a TCP service). Started once RAM is mapped.
    [[nodiscard]] virtual lazymig::Result<void> start_devices(VcpuGate&) { return {}; }
    virtual void stop_devices() {}
    // The VM now runs elsewhere (the destination resumed it): drop clients, so they
    // reconnect to the destination. Must not block: lazymig's session thread calls it.
    virtual void migrated_away() {}
    // The VM runs here again after migrated_away() (a hybrid source resumed it from the
    // last committed epoch): serve clients again, on the same address. A no-op when
    // nothing was dropped. Must not block: lazymig's session thread calls it.
    [[nodiscard]] virtual lazymig::Result<void> resumed_here() { return {}; }
    // Output commit (hybrid, destination): `open_epoch` tells which epoch output produced
    // now belongs to (0: release at once); the workload holds external output of epoch
    // e until release_output(n) with n >= e. Unset (the default, and on a source):
    // output goes out at once.
    virtual void hold_output(std::function<std::uint64_t()> open_epoch) { (void)open_epoch; }
    virtual void release_output(std::uint64_t epoch) { (void)epoch; }
};

[[nodiscard]] std::unique_ptr<Workload> make_workload(const WorkloadConfig& cfg);

// Paces one vCPU at `ops_per_s` (0: unpaced). tick() after every guest operation: a
// safe point, and once per batch a halt until the next batch is due — a guest timer,
// which a pause or a stop interrupts at once.
class Pacer {
public:
    explicit Pacer(double ops_per_s);
    [[nodiscard]] bool tick(VcpuGate& gate);

private:
    std::uint64_t batch_ = 1;
    std::uint64_t done_ = 0;
    VcpuGate::Clock::duration period_{};
    VcpuGate::Clock::time_point next_{};
};

}  // namespace vmm
