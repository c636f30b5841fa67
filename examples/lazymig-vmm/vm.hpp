// vm.hpp — one virtual machine: guest RAM, vCPU threads running a workload, the
// workload's devices, and the VmmHooks lazymig drives.
//
// Ownership: Vm owns the GuestMemory, the gate, the registers, the workload and the
// vCPU threads (members in that order, so the threads go first and RAM last). stop()
// (or the destructor) stops the vCPUs, joins them, then stops the devices. A Migration
// using hooks() must be destroyed before the Vm.
//
// Threads: start()/stop() from the owner (main); everything else from any thread.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "lazymig/lazymig.hpp"
#include "vcpu_gate.hpp"
#include "workload.hpp"

namespace vmm {

struct VmConfig {
    std::size_t memory = 256u << 20;
    lazymig::Backing backing = lazymig::Backing::memfd;
    WorkloadConfig workload{};
    bool incoming = false;  // wait for a migration instead of booting
};

class EventBus;

class Vm {
public:
    [[nodiscard]] static lazymig::Result<std::unique_ptr<Vm>> create(const VmConfig& cfg);
    ~Vm();
    Vm(const Vm&) = delete;
    Vm& operator=(const Vm&) = delete;

    // Boots the workload (unless incoming), starts its devices, then the vCPU threads.
    // On an incoming VM the vCPUs park at once and RAM is not touched until lazymig
    // has loaded the device state and resumed them.
    [[nodiscard]] lazymig::Result<void> start();
    void stop();

    // pause_vcpus, resume_vcpus, save_device_state, load_device_state.
    [[nodiscard]] lazymig::VmmHooks hooks();
    [[nodiscard]] std::vector<lazymig::GuestRegion> regions() const { return {mem_.region()}; }

    // QMP stop/cont: refused while the VM has no state yet or after it migrated away.
    [[nodiscard]] lazymig::Result<void> user_stop();
    [[nodiscard]] lazymig::Result<void> user_cont();
    // Parks the vCPUs, runs the workload's checker on RAM and registers, resumes.
    [[nodiscard]] lazymig::Result<CheckResult> check();
    // The destination resumed the VM (source side): its devices' clients move there.
    void handed_over();
    // The migration completed on this (source) side: the VM stays parked for good.
    void migrated_away();
    // Output commit (Workload::hold_output / release_output).
    void hold_output(std::function<std::uint64_t()> open_epoch);
    void release_output(std::uint64_t epoch);

    // QMP STOP and RESUME events go to `events` from now on (null: none). The run state
    // they report leaves out the checker's brief park (PauseReason::check).
    void set_events(EventBus* events);

    [[nodiscard]] nlohmann::json status() const;
    // The vCPU threads, named "vcpuN", for lazymig's blocktime (complete once start() returned).
    [[nodiscard]] std::vector<lazymig::VcpuThread> vcpu_threads() const;
    [[nodiscard]] std::optional<std::uint16_t> service_port() const { return workload_->service_port(); }
    [[nodiscard]] const VmConfig& config() const noexcept { return cfg_; }

private:
    explicit Vm(const VmConfig& cfg);
    [[nodiscard]] GuestView view() const { return {mem_.data(), mem_.size()}; }
    [[nodiscard]] lazymig::Result<std::vector<std::byte>> save_state();
    [[nodiscard]] lazymig::Result<void> load_state(std::span<const std::byte> blob);
    [[nodiscard]] std::string poisoned(std::uintptr_t addr) const;
    void run_vcpu_thread(unsigned v);
    // gate_.pause/resume for a reason that changes the run state QMP reports: emits STOP
    // when the VM stops running, RESUME when it runs again.
    void park(PauseReason why);
    void unpark(PauseReason why);

    VmConfig cfg_;
    lazymig::GuestMemory mem_;
    VcpuGate gate_;
    std::vector<VcpuRegs> regs_;  // vCPU v's own while it runs; anyone's while parked
    std::unique_ptr<Workload> workload_;
    std::uint64_t seed_ = 0;
    std::atomic<bool> has_state_{false};  // booted here, or the device state arrived
    std::atomic<bool> migrated_{false};
    std::mutex check_mu_;                 // one checker at a time
    mutable std::mutex err_mu_;
    std::vector<std::string> vcpu_errors_;  // vCPUs stopped by a poisoned page
    std::vector<std::thread> vcpus_;      // joined in stop()
    std::vector<lazymig::VcpuThread> vcpu_tids_;  // under err_mu_; each thread adds itself
    std::mutex run_mu_;                   // orders park/unpark with their events
    EventBus* events_ = nullptr;          // guarded by run_mu_
};

}  // namespace vmm
