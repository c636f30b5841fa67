// guest_layout.hpp — how every workload lays out guest RAM, so that a checker on the
// destination can read it without help.
//
//   page 0            BootHeader: magic, workload, vCPUs, pages, seed, parameters
//   page p >= 1       bytes [0, 8): the page tag, page_tag(seed, p), written at boot
//                     (or first touch); the rest belongs to the workload
//
// Guest pages are 4 KiB whatever the backing (a 2 MiB huge page holds 512 of them).
// A page that reads as zero where a tag belongs was lost (never arrived, or placed as
// a zero page); a wrong tag means corrupt or misplaced contents. Checkers name a bad
// page by guest-physical address (offset in RAM) and host address.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

namespace vmm {

inline constexpr std::size_t kGuestPage = 4096;

enum class WorkloadKind : std::uint32_t { invalid = 0, pattern, bank, kv, idle, dirty };
[[nodiscard]] std::string_view to_string(WorkloadKind) noexcept;

struct GuestView {
    std::byte* base = nullptr;
    std::size_t size = 0;
    [[nodiscard]] std::size_t pages() const noexcept { return size / kGuestPage; }
    [[nodiscard]] std::byte* page(std::size_t i) const noexcept { return base + i * kGuestPage; }
    template <class T>
    [[nodiscard]] T* at(std::size_t page_index, std::size_t offset) const noexcept {
        return reinterpret_cast<T*>(page(page_index) + offset);
    }
};

// Per-vCPU registers: what a workload keeps outside guest RAM, and what the device
// state blob carries. Meaning per workload (see workloads/*.cpp).
struct VcpuRegs {
    std::uint64_t r[8]{};
};

struct CheckResult {
    bool ok = false;
    std::string detail;
};

// Page 0. Written once at boot on the source; migrates like any page.
struct BootHeader {
    char magic[8];            // "LZMVMM01"
    std::uint32_t workload;   // WorkloadKind
    std::uint32_t vcpus;
    std::uint64_t pages;      // guest pages, including page 0
    std::uint64_t seed;       // per boot; makes tags differ between VMs and boots
    std::uint64_t params[8];  // workload parameters (see each workload)
};
inline constexpr char kBootMagic[8] = {'L', 'Z', 'M', 'V', 'M', 'M', '0', '1'};

[[nodiscard]] constexpr std::uint64_t mix64(std::uint64_t x) noexcept {  // splitmix64 finaliser
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
// Never zero, so a zero page never carries a valid tag.
[[nodiscard]] constexpr std::uint64_t page_tag(std::uint64_t seed, std::size_t page) noexcept {
    return mix64(seed ^ (page * 0x9e3779b97f4a7c15ull)) | 1;
}

// xorshift64*: the vCPUs' random numbers; the state lives in a register.
[[nodiscard]] inline std::uint64_t next_random(std::uint64_t& state) noexcept {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545f4914f6cdd1dull;
}

// Guest RAM is shared with other vCPUs and with the checker: word accesses go through
// atomic_ref so that concurrent access is defined (relaxed: ordering comes from locks
// in guest RAM or from the gate).
[[nodiscard]] inline std::uint64_t load_word(const GuestView& g, std::size_t page, std::size_t off) noexcept {
    return std::atomic_ref<std::uint64_t>(*g.at<std::uint64_t>(page, off)).load(std::memory_order_relaxed);
}
inline void store_word(const GuestView& g, std::size_t page, std::size_t off, std::uint64_t v) noexcept {
    std::atomic_ref<std::uint64_t>(*g.at<std::uint64_t>(page, off)).store(v, std::memory_order_relaxed);
}

void write_boot_header(const GuestView& g, WorkloadKind kind, std::uint32_t vcpus, std::uint64_t seed,
                       std::span<const std::uint64_t> params);
[[nodiscard]] const BootHeader& boot_header(const GuestView& g) noexcept;
// Empty when page 0 matches; else what is wrong with it.
[[nodiscard]] std::string check_boot_header(const GuestView& g, WorkloadKind kind, std::uint32_t vcpus);

// "page 12 (gpa 0xc000, host 0x7f12345c000)"
[[nodiscard]] std::string describe_page(const GuestView& g, std::size_t page);
// Empty when page `p` carries its tag; else "page ... lost (reads as zero)" or "... corrupt tag".
[[nodiscard]] std::string check_tag(const GuestView& g, std::uint64_t seed, std::size_t p);

// Collects the first failure and a count, so a checker reports one named page and
// how many more there were.
class CheckReport {
public:
    void fail(std::string what) {
        if (failures_++ == 0) first_ = std::move(what);
    }
    [[nodiscard]] bool failed() const noexcept { return failures_ != 0; }
    [[nodiscard]] CheckResult finish(std::string ok_detail) const;

private:
    std::uint64_t failures_ = 0;
    std::string first_;
};

}  // namespace vmm
