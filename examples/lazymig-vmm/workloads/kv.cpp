// kv: the vCPUs serve a key-value store whose table lives in guest RAM.
#include <optional>

#include "../log.hpp"
#include "workloads.hpp"

namespace vmm {

namespace {
enum : unsigned { kInserted = 0, kSets = 1, kGets = 2 };
}

void KvWorkload::boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) {
    const std::uint64_t params[] = {(ram.pages() - 1) * KvTable::kSlotsPerPage};
    write_boot_header(ram, kind(), cfg_.vcpus, seed, params);
    KvTable::format(ram, seed);
    for (auto& r : regs) r = VcpuRegs{};
}

void KvWorkload::run_vcpu(unsigned, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) {
    std::optional<KvTable> table;  // built after the first park: on a destination, page 0
                                   // (the seed) arrives with the migration
    KvDevice::Request req;
    while (device_ && device_->next(gate, req)) {
        if (!table) table.emplace(ram, boot_header(ram).seed, &gate);
        auto reply = table->execute(req.line, regs.r[kInserted], regs.r[kSets], regs.r[kGets]);
        if (!reply) {  // a pause came while it waited for a slot lock: run it after the pause
            device_->requeue(std::move(req));
            continue;
        }
        meter_.add();
        // Output commit (hybrid destination): the ack belongs to the epoch open now, read
        // after the write and before the next safe point, so the epoch that holds the
        // write is the one whose commit releases the ack. 0 elsewhere: it goes out at once.
        device_->respond(req, std::move(*reply), open_epoch_ ? open_epoch_() : 0);
    }
}

CheckResult KvWorkload::check(const GuestView& ram, std::span<const VcpuRegs> regs) const {
    if (auto bad = check_boot_header(ram, kind(), cfg_.vcpus); !bad.empty()) return {false, bad};
    std::uint64_t keys = 0;
    for (const auto& r : regs) keys += r.r[kInserted];
    return KvTable(ram, boot_header(ram).seed).check(keys);
}

nlohmann::json KvWorkload::status() const {
    auto s = meter_.status("requests/s");
    if (device_) s["service"] = device_->status();
    return s;
}

lazymig::Result<void> KvWorkload::start_devices(VcpuGate& gate) {
    auto dev = KvDevice::start(cfg_.kv_port, gate);
    if (!dev) return std::unexpected(dev.error());
    device_ = std::move(*dev);
    return {};
}

// The vCPU threads are gone by now (Vm stops them first): nobody calls next/respond.
void KvWorkload::stop_devices() { device_.reset(); }

void KvWorkload::migrated_away() {
    if (device_) device_->drop_clients();
}

lazymig::Result<void> KvWorkload::resumed_here() { return device_ ? device_->serve_again() : lazymig::Result<void>{}; }

}  // namespace vmm
