// workloads.hpp — the concrete workloads. Each class's step() is one guest operation on
// one vCPU, public so that the checker tests can drive a workload deterministically.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>

#include "../workload.hpp"
#include "kv_device.hpp"
#include "kv_table.hpp"

namespace vmm {

// The pages [first, first + count) a vCPU owns out of pages 1..total-1.
struct Share {
    std::size_t first = 0, count = 0;
};
[[nodiscard]] Share vcpu_share(std::size_t pages, std::uint32_t vcpus, unsigned id) noexcept;

// Counts guest operations for query-status: the total, and the rate since the last look.
class OpsMeter {
public:
    void add(std::uint64_t n = 1) noexcept { ops_.fetch_add(n, std::memory_order_relaxed); }
    [[nodiscard]] nlohmann::json status(std::string_view unit) const;

private:
    std::atomic<std::uint64_t> ops_{0};
    mutable std::mutex mu_;  // the last sample
    mutable std::uint64_t last_ops_ = 0;
    mutable std::chrono::steady_clock::time_point last_{std::chrono::steady_clock::now()};
    mutable double last_rate_ = 0;
};

// Each vCPU walks its share of pages incrementing the page's counter (bytes [8, 16)),
// one pass after another. Registers: r0 pass, r1 cursor, r2 first page, r3 page count.
// Invariant: pages before the cursor hold pass + 1, pages from it on hold pass.
class PatternWorkload final : public Workload {
public:
    explicit PatternWorkload(const WorkloadConfig& cfg) : cfg_(cfg) {}
    [[nodiscard]] WorkloadKind kind() const noexcept override { return WorkloadKind::pattern; }
    void boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) override;
    void run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) override;
    [[nodiscard]] CheckResult check(const GuestView& ram, std::span<const VcpuRegs> regs) const override;
    [[nodiscard]] nlohmann::json status() const override { return meter_.status("pages/s"); }
    static void step(const GuestView& ram, VcpuRegs& regs) noexcept;

private:
    WorkloadConfig cfg_;
    OpsMeter meter_;
};

// Four accounts in every page but page 0; vCPUs move money between random accounts
// under spinlocks that live in guest RAM. The sum never changes. Registers: r0 random
// state, r1 transfers done.
class BankWorkload final : public Workload {
public:
    static constexpr std::int64_t kInitialBalance = 1000;
    explicit BankWorkload(const WorkloadConfig& cfg) : cfg_(cfg) {}
    [[nodiscard]] WorkloadKind kind() const noexcept override { return WorkloadKind::bank; }
    void boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) override;
    void run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) override;
    [[nodiscard]] CheckResult check(const GuestView& ram, std::span<const VcpuRegs> regs) const override;
    [[nodiscard]] nlohmann::json status() const override { return meter_.status("transfers/s"); }
    // One transfer. False: a pause came while waiting for a lock; nothing was written.
    static bool step(const GuestView& ram, VcpuRegs& regs, const VcpuGate* gate = nullptr) noexcept;
    // Where account `a` lives (for tests that damage one).
    [[nodiscard]] static std::size_t account_page(std::size_t a) noexcept;
    [[nodiscard]] static std::size_t account_offset(std::size_t a) noexcept;

private:
    WorkloadConfig cfg_;
    OpsMeter meter_;
};

// A hash table in guest RAM (KvTable) served over TCP by KvDevice; vCPUs execute the
// requests. Registers: r0 keys inserted, r1 SETs, r2 GETs.
class KvWorkload final : public Workload {
public:
    explicit KvWorkload(const WorkloadConfig& cfg) : cfg_(cfg) {}
    ~KvWorkload() override { stop_devices(); }
    [[nodiscard]] WorkloadKind kind() const noexcept override { return WorkloadKind::kv; }
    void boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) override;
    void run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) override;
    [[nodiscard]] CheckResult check(const GuestView& ram, std::span<const VcpuRegs> regs) const override;
    [[nodiscard]] nlohmann::json status() const override;
    [[nodiscard]] lazymig::Result<void> start_devices(VcpuGate& gate) override;
    void stop_devices() override;
    void migrated_away() override;
    [[nodiscard]] lazymig::Result<void> resumed_here() override;
    void hold_output(std::function<std::uint64_t()> open_epoch) override { open_epoch_ = std::move(open_epoch); }
    void release_output(std::uint64_t epoch) override {
        if (device_) device_->release(epoch);
    }
    [[nodiscard]] std::optional<std::uint16_t> service_port() const override {
        return device_ ? std::optional<std::uint16_t>(device_->port()) : std::nullopt;
    }

private:
    std::function<std::uint64_t()> open_epoch_;  // set before the VM runs here (hold_output)
    WorkloadConfig cfg_;
    OpsMeter meter_;
    std::unique_ptr<KvDevice> device_;  // started before the vCPUs, stopped after them
};

// Each vCPU touches its share once (tags it), then halts until the VM stops.
// Registers: r0 pages touched so far, r1 share first page, r2 share page count.
class IdleWorkload final : public Workload {
public:
    explicit IdleWorkload(const WorkloadConfig& cfg) : cfg_(cfg) {}
    [[nodiscard]] WorkloadKind kind() const noexcept override { return WorkloadKind::idle; }
    void boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) override;
    void run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) override;
    [[nodiscard]] CheckResult check(const GuestView& ram, std::span<const VcpuRegs> regs) const override;
    static void step(const GuestView& ram, VcpuRegs& regs) noexcept;

private:
    WorkloadConfig cfg_;
};

// Writes pages of a working set at a set rate in a seq, random or zipf order. Pages of
// the working set are tagged at boot; the rest stay zero. Registers: r0 random state,
// r1 writes done, r2 seq cursor. The page counters sum to the writes done.
class DirtyWorkload final : public Workload {
public:
    explicit DirtyWorkload(const WorkloadConfig& cfg) : cfg_(cfg) {}
    [[nodiscard]] WorkloadKind kind() const noexcept override { return WorkloadKind::dirty; }
    void boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) override;
    void run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) override;
    [[nodiscard]] CheckResult check(const GuestView& ram, std::span<const VcpuRegs> regs) const override;
    [[nodiscard]] nlohmann::json status() const override;
    void step(const GuestView& ram, VcpuRegs& regs, unsigned id) const noexcept;
    [[nodiscard]] std::size_t working_set_pages(const GuestView& ram) const noexcept;

private:
    WorkloadConfig cfg_;
    OpsMeter meter_;
};

}  // namespace vmm
