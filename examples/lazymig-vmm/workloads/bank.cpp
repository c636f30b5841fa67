// bank: random transfers between accounts spread over every page; the total is fixed.
//
// Account (48 bytes; four per page at offsets 64, 1088, 2112, 3136):
//   u32 lock (a spinlock in guest RAM: 0 free, 1 held), u32 pad, i64 balance,
//   u64 version (transfers that touched it), u64 partner (the other account of its last
//   transfer, or kNone), u64 partner_version (the partner's version after it),
//   u64 check = account_check(seed, id, all of the above)
// The check word names a page whose bytes were damaged or lost. An old copy of a page
// is self-consistent, but its accounts' versions are behind what their last partners
// saw them reach: that names a stale page while the partner's record survives (until
// the partner's next transfer). The sum catches every stale page, named or not.
#include <vector>

#include <fmt/format.h>

#include "guest_lock.hpp"
#include "workloads.hpp"

namespace vmm {

namespace {
constexpr std::size_t kPerPage = 4, kSpacing = 1024, kFirstOffset = 64;
constexpr std::size_t kLock = 0, kBalance = 8, kVersion = 16, kPartner = 24, kPartnerVersion = 32, kCheck = 40;
constexpr std::uint64_t kNone = ~0ull;
enum : unsigned { kRandom = 0, kTransfers = 1, kSeed = 2 };

struct Account {
    std::int64_t balance = BankWorkload::kInitialBalance;
    std::uint64_t version = 0, partner = kNone, partner_version = 0;
};

std::uint64_t account_check(std::uint64_t seed, std::uint64_t a, const Account& x) {
    return mix64(seed ^ mix64(a * 0x9e3779b97f4a7c15ull ^ static_cast<std::uint64_t>(x.balance)) ^
                 mix64(x.version + 0x632be59bd9b4e019ull) ^ mix64(x.partner * 3 + x.partner_version)) | 1;
}

std::uint32_t& lock_word(const GuestView& g, std::size_t a) {
    return *g.at<std::uint32_t>(BankWorkload::account_page(a), BankWorkload::account_offset(a) + kLock);
}

Account read_account(const GuestView& g, std::size_t a) {
    const std::size_t p = BankWorkload::account_page(a), o = BankWorkload::account_offset(a);
    return {static_cast<std::int64_t>(load_word(g, p, o + kBalance)), load_word(g, p, o + kVersion),
            load_word(g, p, o + kPartner), load_word(g, p, o + kPartnerVersion)};
}

void write_account(const GuestView& g, std::uint64_t seed, std::size_t a, const Account& x) {
    const std::size_t p = BankWorkload::account_page(a), o = BankWorkload::account_offset(a);
    store_word(g, p, o + kBalance, static_cast<std::uint64_t>(x.balance));
    store_word(g, p, o + kVersion, x.version);
    store_word(g, p, o + kPartner, x.partner);
    store_word(g, p, o + kPartnerVersion, x.partner_version);
    store_word(g, p, o + kCheck, account_check(seed, a, x));
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
        write_account(ram, seed, a, Account{});
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
    Account f = read_account(ram, from), t = read_account(ram, to);
    f.balance -= amount;
    t.balance += amount;
    ++f.version;
    ++t.version;
    f.partner = to;
    f.partner_version = t.version;
    t.partner = from;
    t.partner_version = f.version;
    write_account(ram, r[kSeed], from, f);
    write_account(ram, r[kSeed], to, t);
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
    std::vector<bool> sound(n, false);  // the account's own bytes check out
    for (std::size_t p = 1; p < ram.pages(); ++p) {
        if (auto bad = check_tag(ram, seed, p); !bad.empty()) {
            report.fail(std::move(bad));
            continue;
        }
        for (std::size_t k = 0; k < kPerPage; ++k) {
            const std::size_t a = (p - 1) * kPerPage + k, o = account_offset(a);
            const Account x = read_account(ram, a);
            sum += x.balance;
            if (lock_word(ram, a) != 0)
                report.fail(fmt::format("{}: account {} locked while every vCPU is parked", describe_page(ram, p), a));
            else if (load_word(ram, p, o + kCheck) != account_check(seed, a, x) || (x.partner != kNone && x.partner >= n))
                report.fail(fmt::format("{}: account {} (offset {:#x}) corrupt: balance {} version {} fail their check word",
                                        describe_page(ram, p), a, o, x.balance, x.version));
            else
                sound[a] = true;
        }
    }
    // Each account's last partner must have reached at least the version it recorded.
    for (std::size_t a = 0; a < n && !report.failed(); ++a) {
        if (!sound[a]) continue;
        const Account x = read_account(ram, a);
        if (x.partner == kNone || !sound[x.partner]) continue;
        const Account y = read_account(ram, x.partner);
        if (y.version < x.partner_version)
            report.fail(fmt::format("{} stale: account {} is at version {}, but account {} (page {}) saw it reach {}",
                                    describe_page(ram, account_page(x.partner)), x.partner, y.version, a,
                                    account_page(a), x.partner_version));
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
