#include "guest_layout.hpp"

#include <algorithm>

#include <fmt/format.h>

namespace vmm {

std::string_view to_string(WorkloadKind k) noexcept {
    switch (k) {
    case WorkloadKind::pattern: return "pattern";
    case WorkloadKind::bank: return "bank";
    case WorkloadKind::kv: return "kv";
    case WorkloadKind::idle: return "idle";
    case WorkloadKind::dirty: return "dirty";
    case WorkloadKind::invalid: break;
    }
    return "invalid";
}

void write_boot_header(const GuestView& g, WorkloadKind kind, std::uint32_t vcpus, std::uint64_t seed,
                       std::span<const std::uint64_t> params) {
    BootHeader h{};
    std::memcpy(h.magic, kBootMagic, sizeof h.magic);
    h.workload = static_cast<std::uint32_t>(kind);
    h.vcpus = vcpus;
    h.pages = g.pages();
    h.seed = seed;
    std::copy_n(params.begin(), std::min(params.size(), std::size(h.params)), h.params);
    std::memcpy(g.base, &h, sizeof h);
}

const BootHeader& boot_header(const GuestView& g) noexcept {
    return *reinterpret_cast<const BootHeader*>(g.base);
}

std::string check_boot_header(const GuestView& g, WorkloadKind kind, std::uint32_t vcpus) {
    const BootHeader& h = boot_header(g);
    if (std::memcmp(h.magic, kBootMagic, sizeof h.magic) != 0)
        return fmt::format("{}: boot header lost or corrupt (bad magic)", describe_page(g, 0));
    if (h.workload != static_cast<std::uint32_t>(kind))
        return fmt::format("{}: boot header names workload {}, expected {}", describe_page(g, 0),
                           to_string(static_cast<WorkloadKind>(h.workload)), to_string(kind));
    if (h.vcpus != vcpus || h.pages != g.pages())
        return fmt::format("{}: boot header says {} vCPUs and {} pages, this VM has {} and {}",
                           describe_page(g, 0), h.vcpus, h.pages, vcpus, g.pages());
    return {};
}

std::string describe_page(const GuestView& g, std::size_t page) {
    return fmt::format("page {} (gpa {:#x}, host {})", page, page * kGuestPage,
                       static_cast<const void*>(g.page(page)));
}

std::string check_tag(const GuestView& g, std::uint64_t seed, std::size_t p) {
    const std::uint64_t tag = load_word(g, p, 0);
    if (tag == page_tag(seed, p)) return {};
    if (tag == 0) return fmt::format("{} lost (reads as zero)", describe_page(g, p));
    return fmt::format("{} corrupt: tag {:#018x}, expected {:#018x}", describe_page(g, p), tag,
                       page_tag(seed, p));
}

CheckResult CheckReport::finish(std::string ok_detail) const {
    if (failures_ == 0) return {true, std::move(ok_detail)};
    if (failures_ == 1) return {false, first_};
    return {false, fmt::format("{} (and {} more bad)", first_, failures_ - 1)};
}

}  // namespace vmm
