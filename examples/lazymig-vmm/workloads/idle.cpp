// idle: touch every page once, then halt (a guest waiting for interrupts).
#include <fmt/format.h>

#include "workloads.hpp"

namespace vmm {

namespace {
constexpr std::size_t kCounter = 8;
enum : unsigned { kTouched = 0, kFirst = 1, kCount = 2, kSeed = 3 };
}  // namespace

void IdleWorkload::boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) {
    write_boot_header(ram, kind(), cfg_.vcpus, seed, {});
    for (unsigned v = 0; v < regs.size(); ++v) {
        const Share s = vcpu_share(ram.pages(), cfg_.vcpus, v);
        regs[v] = VcpuRegs{};
        regs[v].r[kFirst] = s.first;
        regs[v].r[kCount] = s.count;
        regs[v].r[kSeed] = seed;
    }
}

void IdleWorkload::step(const GuestView& ram, VcpuRegs& regs) noexcept {
    std::uint64_t* r = regs.r;
    if (r[kTouched] == r[kCount]) return;
    const std::size_t p = r[kFirst] + r[kTouched]++;
    store_word(ram, p, 0, page_tag(r[kSeed], p));
    store_word(ram, p, kCounter, 1);
}

void IdleWorkload::run_vcpu(unsigned, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) {
    while (gate.safe_point() && regs.r[kTouched] < regs.r[kCount]) step(ram, regs);
    // Halted: only a pause (parks, then halts again) or the VM stopping wakes it.
    while (gate.wait_work([] { return false; })) {
    }
}

CheckResult IdleWorkload::check(const GuestView& ram, std::span<const VcpuRegs> regs) const {
    if (auto bad = check_boot_header(ram, kind(), cfg_.vcpus); !bad.empty()) return {false, bad};
    const std::uint64_t seed = boot_header(ram).seed;
    CheckReport report;
    std::uint64_t touched = 0;
    for (unsigned v = 0; v < regs.size(); ++v) {
        const std::uint64_t* r = regs[v].r;
        const Share s = vcpu_share(ram.pages(), cfg_.vcpus, v);
        if (r[kFirst] != s.first || r[kCount] != s.count || r[kTouched] > s.count) {
            report.fail(fmt::format("vcpu{} registers corrupt", v));
            continue;
        }
        touched += r[kTouched];
        for (std::size_t i = 0; i < s.count; ++i) {
            const std::size_t p = s.first + i;
            if (i < r[kTouched]) {
                if (auto bad = check_tag(ram, seed, p); !bad.empty()) report.fail(std::move(bad));
                else if (load_word(ram, p, kCounter) != 1)
                    report.fail(fmt::format("{} corrupt: counter {}, expected 1", describe_page(ram, p),
                                            load_word(ram, p, kCounter)));
            } else if (load_word(ram, p, 0) != 0 || load_word(ram, p, kCounter) != 0) {
                report.fail(fmt::format("{} written but never touched by its vCPU", describe_page(ram, p)));
            }
        }
    }
    return report.finish(fmt::format("idle: {} of {} pages touched, all consistent", touched, ram.pages() - 1));
}

}  // namespace vmm
