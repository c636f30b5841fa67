#include "vm.hpp"

#include <sys/random.h>

#include <algorithm>
#include <latch>
#include <cstdlib>

#include <fmt/format.h>

#include "device_state.hpp"
#include "events.hpp"
#include "log.hpp"
#include "sigbus_guard.hpp"

namespace vmm {

Vm::Vm(const VmConfig& cfg)
    : cfg_(cfg),
      gate_(cfg.incoming ? static_cast<std::uint32_t>(PauseReason::migration) : 0),
      regs_(cfg.workload.vcpus),
      workload_(make_workload(cfg.workload)) {}

lazymig::Result<std::unique_ptr<Vm>> Vm::create(const VmConfig& cfg) {
    if (cfg.workload.vcpus == 0 || cfg.workload.vcpus > 64)
        return lazymig::logic_error(fmt::format("vcpus must be 1..64, not {}", cfg.workload.vcpus));
    if (cfg.memory < 2 * kGuestPage * cfg.workload.vcpus)
        return lazymig::logic_error(fmt::format("memory {} bytes is too small for {} vCPUs", cfg.memory, cfg.workload.vcpus));
    std::unique_ptr<Vm> vm(new Vm(cfg));
    if (!vm->workload_) return lazymig::logic_error("unknown workload");
    auto mem = lazymig::GuestMemory::create("ram0", cfg.memory, cfg.backing, /*populate=*/false);
    if (!mem) return std::unexpected(mem.error().wrap("guest RAM"));
    vm->mem_ = std::move(*mem);
    return vm;
}

Vm::~Vm() { stop(); }

lazymig::Result<void> Vm::start() {
    if (!cfg_.incoming) {
        if (::getrandom(&seed_, sizeof seed_, 0) != sizeof seed_) return lazymig::sys_error("getrandom boot seed");
        workload_->boot(view(), seed_, regs_);
        has_state_ = true;
        log_event("vm_boot", "workload={} vcpus={} memory={} backing={}", to_string(cfg_.workload.kind),
                  cfg_.workload.vcpus, cfg_.memory, lazymig::to_string(cfg_.backing));
    }
    if (auto ok = workload_->start_devices(gate_); !ok) return ok;
    gate_.add_vcpus(cfg_.workload.vcpus);
    // Each vCPU names itself before start() returns, so a migration started after it
    // can attribute every fault's wait to the vCPU that took it.
    std::latch named(cfg_.workload.vcpus);
    for (unsigned v = 0; v < cfg_.workload.vcpus; ++v) {
        try {
            vcpus_.emplace_back([this, v, &named] {
                {
                    std::lock_guard lock(err_mu_);
                    vcpu_tids_.push_back({static_cast<int>(::gettid()), fmt::format("vcpu{}", v)});
                }
                named.count_down();
                run_vcpu_thread(v);
            });
        } catch (const std::system_error& e) {
            for (unsigned rest = v; rest < cfg_.workload.vcpus; ++rest) named.count_down();
            named.wait();  // the started threads use `named` until they counted down
            return lazymig::sys_error(fmt::format("starting vCPU thread {}", v), e.code().value());
        }
    }
    named.wait();
    log_event("vm_state", "status={}", status()["status"].get<std::string>());
    return {};
}

std::vector<lazymig::VcpuThread> Vm::vcpu_threads() const {
    std::lock_guard lock(err_mu_);
    return vcpu_tids_;
}

std::string Vm::poisoned(std::uintptr_t addr) const {
    const auto base = reinterpret_cast<std::uintptr_t>(mem_.data());
    if (addr < base || addr >= base + mem_.size()) {
        // Not guest RAM: a bug, not a lost page. Say so and die as SIGBUS would have.
        log_event("vm_sigbus_outside_ram", "addr={:#x}", addr);
        std::abort();
    }
    const std::size_t page = (addr - base) / kGuestPage;
    // As a KVM VMM reports a hardware memory error on guest RAM (BUS_MCEERR_AR).
    return fmt::format("memory error: page {} (gpa {:#x}, host {:#x}) never arrived (poisoned)", page,
                       page * kGuestPage, addr);
}

// A vCPU that touches a poisoned page stops for good (its frames are abandoned) and
// leaves the gate, so pause_vcpus still returns; the VM reports an internal error.
void Vm::run_vcpu_thread(unsigned v) {
    if (auto bad = run_guarded([&] { workload_->run_vcpu(v, view(), regs_[v], gate_); })) {
        auto what = fmt::format("vcpu{} stopped: {}", v, poisoned(*bad));
        log_event("vm_vcpu_error", "{}", what);
        std::lock_guard lock(err_mu_);
        vcpu_errors_.push_back(std::move(what));
    }
    gate_.vcpu_exited();
}

void Vm::stop() {
    gate_.stop();
    for (auto& t : vcpus_) t.join();
    vcpus_.clear();
    workload_->stop_devices();
}

lazymig::VmmHooks Vm::hooks() {
    lazymig::VmmHooks h;
    h.pause_vcpus = [this] {
        park(PauseReason::migration);
        log_event("vm_state", "status=paused reason=migration");
    };
    h.resume_vcpus = [this] {
        // A hybrid source that takes the VM back from a checkpoint after it handed it
        // over (handed_over() dropped the devices' clients): its devices serve again
        // before its vCPUs run. Elsewhere nothing was dropped and this does nothing.
        if (auto r = workload_->resumed_here(); !r) log_event("vm_device_error", "{}", r.error().message());
        unpark(PauseReason::migration);
        log_event("vm_state", "status={} reason=migration", gate_.running() ? "running" : "paused");
    };
    h.save_device_state = [this] { return save_state(); };
    h.load_device_state = [this](std::span<const std::byte> blob) { return load_state(blob); };
    return h;
}

// REQUIRES (lazymig's call order): vCPUs parked by pause_vcpus.
lazymig::Result<std::vector<std::byte>> Vm::save_state() {
    if (!has_state_) return lazymig::logic_error("save device state: this VM has no state (incoming, not loaded)");
    auto blob = encode_device_state({cfg_.workload.kind, cfg_.workload.vcpus, cfg_.memory, seed_, regs_});
    log_event("vm_device_state_saved", "bytes={}", blob.size());
    return blob;
}

// REQUIRES: the vCPUs are parked: an incoming VM (they start parked), or a source taking
// the VM back from a hybrid checkpoint (the last committed epoch's device state; its
// memory was written by lazymig before this call).
lazymig::Result<void> Vm::load_state(std::span<const std::byte> blob) {
    if (cfg_.incoming && has_state_) return lazymig::logic_error("load device state: this VM already has state");
    auto s = decode_device_state(blob);
    if (!s) return std::unexpected(s.error());
    if (s->kind != cfg_.workload.kind || s->vcpus != cfg_.workload.vcpus || s->memory != cfg_.memory)
        return lazymig::logic_error(fmt::format(
            "device state is for workload {} with {} vCPUs and {} bytes of RAM; this VM runs {} with {} and {}",
            to_string(s->kind), s->vcpus, s->memory, to_string(cfg_.workload.kind), cfg_.workload.vcpus, cfg_.memory));
    // Element-wise: each vCPU thread holds a reference to its own element.
    std::copy(s->regs.begin(), s->regs.end(), regs_.begin());
    seed_ = s->seed;
    has_state_ = true;
    log_event("vm_device_state_loaded", "bytes={} workload={}", blob.size(), to_string(cfg_.workload.kind));
    return {};
}

namespace {
constexpr std::uint32_t kCheck = static_cast<std::uint32_t>(PauseReason::check);
}  // namespace

void Vm::set_events(EventBus* events) {
    std::lock_guard lock(run_mu_);
    events_ = events;
}

void Vm::park(PauseReason why) {
    std::lock_guard lock(run_mu_);
    const bool was_running = has_state_ && (gate_.reasons() & ~kCheck) == 0;
    gate_.pause(why);
    if (was_running && events_) events_->emit("STOP");
}

void Vm::unpark(PauseReason why) {
    std::lock_guard lock(run_mu_);
    const bool was_running = has_state_ && (gate_.reasons() & ~kCheck) == 0;
    gate_.resume(why);
    if (!was_running && has_state_ && (gate_.reasons() & ~kCheck) == 0 && events_) events_->emit("RESUME");
}

lazymig::Result<void> Vm::user_stop() {
    if (migrated_) return lazymig::logic_error("the VM has migrated away; it runs on the destination now");
    if (!has_state_) return lazymig::logic_error("the VM is waiting for an incoming migration");
    park(PauseReason::user);
    log_event("vm_state", "status=paused reason=user");
    return {};
}

lazymig::Result<void> Vm::user_cont() {
    if (migrated_) return lazymig::logic_error("the VM has migrated away; it runs on the destination now");
    if (!has_state_) return lazymig::logic_error("the VM is waiting for an incoming migration");
    if (gate_.reasons() & static_cast<std::uint32_t>(PauseReason::migration))
        return lazymig::logic_error("the VM is paused for the migration's switchover: it runs again here if the "
                                    "migration fails before the destination may run it, or on the destination "
                                    "once it resumes there; query-migrate shows which");
    unpark(PauseReason::user);
    log_event("vm_state", "status={} reason=user", gate_.running() ? "running" : "paused");
    return {};
}

lazymig::Result<CheckResult> Vm::check() {
    if (!has_state_) return lazymig::logic_error("no guest state yet: the incoming migration has not loaded the device state");
    std::lock_guard lock(check_mu_);
    gate_.pause(PauseReason::check);
    CheckResult r;
    if (auto bad = run_guarded([&] { r = workload_->check(view(), regs_); })) r = {false, poisoned(*bad)};
    gate_.resume(PauseReason::check);
    log_event("vm_check", "ok={} detail=\"{}\"", r.ok, r.detail);
    return r;
}

void Vm::handed_over() {
    workload_->migrated_away();
    log_event("vm_handed_over", "devices=dropped-clients");
}

void Vm::hold_output(std::function<std::uint64_t()> open_epoch) { workload_->hold_output(std::move(open_epoch)); }
void Vm::release_output(std::uint64_t epoch) { workload_->release_output(epoch); }

void Vm::migrated_away() {
    migrated_ = true;
    park(PauseReason::migrated);
    log_event("vm_state", "status=postmigrate");
}

nlohmann::json Vm::status() const {
    const std::uint32_t reasons = gate_.reasons();
    std::vector<std::string> errors;
    {
        std::lock_guard lock(err_mu_);
        errors = vcpu_errors_;
    }
    std::string status = !errors.empty() ? "internal-error"
                       : migrated_       ? "postmigrate"
                       : !has_state_     ? "inmigrate"
                       : reasons == 0    ? "running"
                                         : "paused";
    nlohmann::json why = nlohmann::json::array();
    for (auto [bit, name] : {std::pair{PauseReason::user, "user"}, {PauseReason::migration, "migration"},
                             {PauseReason::check, "check"}, {PauseReason::migrated, "migrated"}})
        if (reasons & static_cast<std::uint32_t>(bit)) why.push_back(name);
    return {{"status", status},
            {"running", reasons == 0 && has_state_},
            {"pause-reasons", why},
            {"workload", std::string(to_string(cfg_.workload.kind))},
            {"vcpus", cfg_.workload.vcpus},
            {"memory", cfg_.memory},
            {"backing", std::string(lazymig::to_string(cfg_.backing))},
            {"vcpu-errors", errors},
            {"workload-status", workload_->status()}};
}

}  // namespace vmm
