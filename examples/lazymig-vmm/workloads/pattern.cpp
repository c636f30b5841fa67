// pattern: each vCPU increments the counter of every page of its share, pass after pass.
#include <fmt/format.h>

#include "workloads.hpp"

namespace vmm {

namespace {
constexpr std::size_t kCounter = 8;  // byte offset of the page counter
enum : unsigned { kPass = 0, kCursor = 1, kFirst = 2, kCount = 3 };
}  // namespace

void PatternWorkload::boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) {
    write_boot_header(ram, kind(), cfg_.vcpus, seed, {});
    for (std::size_t p = 1; p < ram.pages(); ++p) {
        store_word(ram, p, 0, page_tag(seed, p));
        store_word(ram, p, kCounter, 0);
    }
    for (unsigned v = 0; v < regs.size(); ++v) {
        const Share s = vcpu_share(ram.pages(), cfg_.vcpus, v);
        regs[v] = VcpuRegs{};
        regs[v].r[kFirst] = s.first;
        regs[v].r[kCount] = s.count;
    }
}

void PatternWorkload::step(const GuestView& ram, VcpuRegs& regs) noexcept {
    std::uint64_t* r = regs.r;
    if (r[kCount] == 0) return;
    const std::size_t p = r[kFirst] + r[kCursor];
    store_word(ram, p, kCounter, load_word(ram, p, kCounter) + 1);
    if (++r[kCursor] == r[kCount]) {
        r[kCursor] = 0;
        ++r[kPass];
    }
}

void PatternWorkload::run_vcpu(unsigned, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) {
    Pacer pacer(cfg_.rate / cfg_.vcpus);
    while (pacer.tick(gate)) {
        step(ram, regs);
        meter_.add();
    }
}

CheckResult PatternWorkload::check(const GuestView& ram, std::span<const VcpuRegs> regs) const {
    if (auto bad = check_boot_header(ram, kind(), cfg_.vcpus); !bad.empty()) return {false, bad};
    const std::uint64_t seed = boot_header(ram).seed;
    CheckReport report;
    std::uint64_t min_pass = UINT64_MAX, max_pass = 0;
    for (unsigned v = 0; v < regs.size(); ++v) {
        const std::uint64_t* r = regs[v].r;
        const Share s = vcpu_share(ram.pages(), cfg_.vcpus, v);
        if (r[kFirst] != s.first || r[kCount] != s.count || r[kCursor] >= std::max<std::uint64_t>(s.count, 1)) {
            report.fail(fmt::format("vcpu{} registers corrupt: share {}+{} cursor {}, expected share {}+{}",
                                    v, r[kFirst], r[kCount], r[kCursor], s.first, s.count));
            continue;
        }
        min_pass = std::min(min_pass, r[kPass]);
        max_pass = std::max(max_pass, r[kPass]);
        for (std::size_t i = 0; i < s.count; ++i) {
            const std::size_t p = s.first + i;
            if (auto bad = check_tag(ram, seed, p); !bad.empty()) {
                report.fail(std::move(bad));
                continue;
            }
            const std::uint64_t want = r[kPass] + (i < r[kCursor] ? 1 : 0);
            const std::uint64_t got = load_word(ram, p, kCounter);
            if (got == want) continue;
            const char* what = got + 1 == want ? "stale (one pass behind)"
                             : got < want      ? "stale"
                                               : "ahead of its vCPU (a write was replayed?)";
            report.fail(fmt::format("{} {}: counter {}, expected {} (vcpu{} pass {} cursor {})",
                                    describe_page(ram, p), what, got, want, v, r[kPass], r[kCursor]));
        }
    }
    return report.finish(fmt::format("pattern: {} pages consistent, vCPU passes {}..{}", ram.pages() - 1,
                                     min_pass == UINT64_MAX ? 0 : min_pass, max_pass));
}

}  // namespace vmm
