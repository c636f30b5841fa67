// bank: random transfers between accounts spread over every page; the total is fixed.
//
// Account (32 bytes; four per page at offsets 64, 1088, 2112, 3136):
//   u32 lock (a spinlock in guest RAM: 0 free, 1 held), u32 pad, i64 balance,
//   u64 version (transfers that touched it), u64 check = account_check(seed, id, balance, version)
// The check word names a page whose bytes were damaged or lost; the sum catches a page
// that is whole but stale (an old copy of a page is self-consistent, so it has no name).
#include <fmt/format.h>

#include "guest_lock.hpp"
#include "workloads.hpp"

namespace vmm {

namespace {
constexpr std::size_t kPerPage = 4, kSpacing = 1024, kFirstOffset = 64;
constexpr std::size_t kLock = 0, kBalance = 8, kVersion = 16, kCheck = 24;
enum : unsigned { kRandom = 0, kTransfers = 1, kSeed = 2 };

std::uint64_t account_check(std::uint64_t seed, std::uint64_t a, std::int64_t balance, std::uint64_t version) {
    return mix64(seed ^ mix64(a * 0x9e3779b97f4a7c15ull ^ static_cast<std::uint64_t>(balance)) ^
                 mix64(version + 0x632be59bd9b4e019ull)) | 1;
}

std::uint32_t& lock_word(const GuestView& g, std::size_t a) {
    return *g.at<std::uint32_t>(BankWorkload::account_page(a), BankWorkload::account_offset(a) + kLock);
}

void write_account(const GuestView& g, std::uint64_t seed, std::size_t a, std::int64_t balance, std::uint64_t version) {
    const std::size_t p = BankWorkload::account_page(a), o = BankWorkload::account_offset(a);
    store_word(g, p, o + kBalance, static_cast<std::uint64_t>(balance));
    store_word(g, p, o + kVersion, version);
    store_word(g, p, o + kCheck, account_check(seed, a, balance, version));
}

std::size_t accounts(const GuestView& g) noexcept { return (g.pages() - 1) * kPerPage; }
}  // namespace

std::size_t BankWorkload::account_page(std::size_t a) noexcept { return 1 + a / kPerPage; }
std::size_t BankWorkload::account_offset(std::size_t a) noexcept { return kFirstOffset + (a % kPerPage) * kSpacing; }

void BankWorkload::boot(const GuestView& ram, std::uint64_t seed, std::span<VcpuRegs> regs) {
    const std::uint64_t params[] = {accounts(ram), kInitialBalance};
    write_boot_header(ram, kind(), cfg_.vcpus, seed, params);
    for (std::size_t p = 1; p < ram.pages(); ++p) store_word(ram, p, 0, page_tag(seed, p));
    for (std::size_t a = 0; a < accounts(ram); ++a) {
        lock_word(ram, a) = 0;
        write_account(ram, seed, a, kInitialBalance, 0);
    }
    for (unsigned v = 0; v < regs.size(); ++v) {
        regs[v] = VcpuRegs{};
        regs[v].r[kRandom] = mix64(seed + v + 1) | 1;
        regs[v].r[kSeed] = seed;
    }
}

bool BankWorkload::step(const GuestView& ram, VcpuRegs& regs, const VcpuGate* gate) noexcept {
    const std::size_t n = accounts(ram);
    if (n < 2) return true;
    std::uint64_t* r = regs.r;
    const std::size_t from = next_random(r[kRandom]) % n;
    std::size_t to = next_random(r[kRandom]) % (n - 1);
    if (to >= from) ++to;
    const auto amount = static_cast<std::int64_t>(next_random(r[kRandom]) % 100 + 1);
    // Locks in account order: no two vCPUs wait on each other.
    const std::size_t lo = std::min(from, to), hi = std::max(from, to);
    if (!guest_lock(lock_word(ram, lo), gate)) return false;
    if (!guest_lock(lock_word(ram, hi), gate)) {
        guest_unlock(lock_word(ram, lo));
        return false;
    }
    auto read = [&](std::size_t a, std::size_t off) { return load_word(ram, account_page(a), account_offset(a) + off); };
    write_account(ram, r[kSeed], from, static_cast<std::int64_t>(read(from, kBalance)) - amount, read(from, kVersion) + 1);
    write_account(ram, r[kSeed], to, static_cast<std::int64_t>(read(to, kBalance)) + amount, read(to, kVersion) + 1);
    guest_unlock(lock_word(ram, hi));
    guest_unlock(lock_word(ram, lo));
    ++r[kTransfers];
    return true;
}

void BankWorkload::run_vcpu(unsigned, const GuestView& ram, VcpuRegs& regs, VcpuGate& gate) {
    Pacer pacer(cfg_.rate / cfg_.vcpus);
    while (pacer.tick(gate))
        if (step(ram, regs, &gate)) meter_.add();
}

CheckResult BankWorkload::check(const GuestView& ram, std::span<const VcpuRegs> regs) const {
    if (auto bad = check_boot_header(ram, kind(), cfg_.vcpus); !bad.empty()) return {false, bad};
    const std::uint64_t seed = boot_header(ram).seed;
    const std::size_t n = accounts(ram);
    CheckReport report;
    std::int64_t sum = 0;
    for (std::size_t p = 1; p < ram.pages(); ++p) {
        if (auto bad = check_tag(ram, seed, p); !bad.empty()) {
            report.fail(std::move(bad));
            continue;
        }
        for (std::size_t k = 0; k < kPerPage; ++k) {
            const std::size_t a = (p - 1) * kPerPage + k, o = account_offset(a);
            const auto balance = static_cast<std::int64_t>(load_word(ram, p, o + kBalance));
            const std::uint64_t version = load_word(ram, p, o + kVersion);
            sum += balance;
            if (lock_word(ram, a) != 0)
                report.fail(fmt::format("{}: account {} locked while every vCPU is parked", describe_page(ram, p), a));
            else if (load_word(ram, p, o + kCheck) != account_check(seed, a, balance, version))
                report.fail(fmt::format("{}: account {} (offset {:#x}) corrupt: balance {} version {} fail their check word",
                                        describe_page(ram, p), a, o, balance, version));
        }
    }
    const auto want = static_cast<std::int64_t>(n) * kInitialBalance;
    if (sum != want)
        report.fail(fmt::format("sum of balances {} expected {} (off by {}){}", sum, want, sum - want,
                                report.failed() ? "" : ": every page is self-consistent, so one holds stale contents"));
    std::uint64_t transfers = 0;
    for (const auto& r : regs) transfers += r.r[kTransfers];
    return report.finish(fmt::format("bank: {} accounts in {} pages sum to {}, {} transfers", n, ram.pages() - 1,
                                     sum, transfers));
}

}  // namespace vmm
