// dirty: write pages of a working set at a set rate, in seq, random or zipf order.
#include <cmath>
#include <numeric>

#include <fmt/format.h>

#include "workloads.hpp"

namespace vmm {

namespace {
constexpr std::size_t kCounter = 8;
enum : unsigned { kRandom = 0, kWrites = 1, kCursor = 2 };

std::uint64_t scatter_multiplier(std::size_t ws) {
    constexpr std::uint64_t kPrime = 1000003;  // coprime with ws: multiplication mod ws is a bijection
    return std::gcd(kPrime, ws) == 1 ? kPrime : 1;
}
}  // namespace

std::size_t DirtyWorkload::working_set_pages(const GuestView& ram) const noexcept {
    const std::size_t usable = ram.pages() - 1;
    return std::clamp<std::size_t>(usable * cfg_.working_set_pct / 100, 1, usable);
}

void DirtyWorkload::boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) {
    const std::size_t ws = working_set_pages(ram);
    const std::uint64_t params[] = {ws, static_cast<std::uint64_t>(cfg_.pattern)};
    write_boot_header(ram, kind(), cfg_.vcpus, seed, params);
    for (std::size_t p = 1; p <= ws; ++p) store_word(ram, p, 0, page_tag(seed, p));
    for (unsigned v = 0; v < regs.size(); ++v) {
        regs[v] = VcpuRegs{};
        regs[v].r[kRandom] = mix64(seed ^ (v + 17)) | 1;
    }
}

void DirtyWorkload::step(const GuestView& ram, VcpuRegs& regs, unsigned id) const noexcept {
    std::uint64_t* r = regs.r;
    const std::size_t ws = working_set_pages(ram);
    std::size_t k = 0;  // index into the working set
    switch (cfg_.pattern) {
    case DirtyPattern::seq: {
        // Each vCPU sweeps its own slice of the working set.
        const std::size_t lo = ws * id / cfg_.vcpus, hi = std::max(lo + 1, ws * (id + 1) / cfg_.vcpus);
        k = std::min(ws - 1, lo + r[kCursor] % (hi - lo));
        r[kCursor] = (r[kCursor] + 1) % (hi - lo);
        break;
    }
    case DirtyPattern::random: k = next_random(r[kRandom]) % ws; break;
    case DirtyPattern::zipf: {
        // Inverse CDF of a continuous 1/x law over [1, ws+1): rank k has weight ~1/(k+1),
        // then ranks are scattered so the hot pages are not all adjacent.
        const double u = static_cast<double>(next_random(r[kRandom]) >> 11) * 0x1.0p-53;
        const auto rank = static_cast<std::size_t>(std::exp(u * std::log(static_cast<double>(ws) + 1))) - 1;
        k = (std::min(rank, ws - 1) * scatter_multiplier(ws)) % ws;
        break;
    }
    case DirtyPattern::invalid: return;
    }
    // Two vCPUs may pick the same page: the counter is incremented atomically.
    std::atomic_ref<std::uint64_t>(*ram.at<std::uint64_t>(1 + k, kCounter)).fetch_add(1, std::memory_order_relaxed);
    ++r[kWrites];
}

void DirtyWorkload::run_vcpu(unsigned id, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) {
    Pacer pacer(cfg_.rate / cfg_.vcpus);
    while (pacer.tick(gate)) {
        step(ram, regs, id);
        meter_.add();
    }
}

CheckResult DirtyWorkload::check(const GuestView& ram, std::span<const VcpuRegs> regs) const {
    if (auto bad = check_boot_header(ram, kind(), cfg_.vcpus); !bad.empty()) return {false, bad};
    const std::uint64_t seed = boot_header(ram).seed;
    const std::size_t ws = working_set_pages(ram);
    CheckReport report;
    std::uint64_t sum = 0, writes = 0;
    for (std::size_t p = 1; p < ram.pages(); ++p) {
        if (p <= ws) {
            if (auto bad = check_tag(ram, seed, p); !bad.empty()) report.fail(std::move(bad));
            sum += load_word(ram, p, kCounter);
        } else if (load_word(ram, p, 0) != 0 || load_word(ram, p, kCounter) != 0) {
            report.fail(fmt::format("{} outside the working set is not zero", describe_page(ram, p)));
        }
    }
    for (const auto& r : regs) writes += r.r[kWrites];
    if (sum != writes)
        report.fail(fmt::format("page counters sum to {}, the vCPUs wrote {} times{}", sum, writes,
                                report.failed() ? "" : ": a page holds stale contents"));
    return report.finish(fmt::format("dirty: {} writes over {} working-set pages ({}), consistent", writes, ws,
                                     to_string(cfg_.pattern)));
}

nlohmann::json DirtyWorkload::status() const {
    auto s = meter_.status("pages/s");
    s["target-rate"] = cfg_.rate;
    s["pattern"] = std::string(to_string(cfg_.pattern));
    s["working-set-percent"] = cfg_.working_set_pct;
    return s;
}

}  // namespace vmm
