// Names of the public enums, both ways.
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "lazymig/lazymig.hpp"

namespace lazymig {

std::string_view to_string(Backing b) noexcept {
    switch (b) {
    case Backing::anon: return "anon";
    case Backing::memfd: return "memfd";
    case Backing::hugetlbfs: return "hugetlbfs";
    case Backing::invalid: break;
    }
    return "invalid";
}

std::string_view to_string(Mode m) noexcept {
    switch (m) {
    case Mode::postcopy: return "postcopy";
    case Mode::precopy: return "precopy";
    case Mode::hybrid: return "hybrid";
    case Mode::invalid: break;
    }
    return "invalid";
}

std::string_view to_string(Phase p) noexcept {
    switch (p) {
    case Phase::idle: return "idle";
    case Phase::setup: return "setup";
    case Phase::precopy: return "precopy";
    case Phase::switchover: return "switchover";
    case Phase::postcopy: return "postcopy";
    case Phase::completed: return "completed";
    case Phase::failed: return "failed";
    case Phase::cancelled: return "cancelled";
    case Phase::paused: return "paused";
    case Phase::recovering: return "recovering";
    case Phase::invalid: break;
    }
    return "invalid";
}

std::string_view to_string(DirtyTracking t) noexcept {
    switch (t) {
    case DirtyTracking::automatic: return "auto";
    case DirtyTracking::wp_async: return "wp-async";
    case DirtyTracking::wp_sync: return "wp-sync";
    case DirtyTracking::vmm: return "vmm";
    case DirtyTracking::invalid: break;
    }
    return "invalid";
}

std::uint32_t default_bulk_channels() noexcept {
    const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    return static_cast<std::uint32_t>(std::clamp<long>(cpus / 2, 1, 8));
}

Result<Backing> parse_backing(std::string_view s) noexcept {
    for (auto b : {Backing::anon, Backing::memfd, Backing::hugetlbfs})
        if (s == to_string(b)) return b;
    return logic_error(fmt::format("unknown backing '{}' (expected anon, memfd or hugetlbfs)", s));
}

Result<Mode> parse_mode(std::string_view s) noexcept {
    for (auto m : {Mode::postcopy, Mode::precopy, Mode::hybrid})
        if (s == to_string(m)) return m;
    return logic_error(fmt::format("unknown mode '{}' (expected postcopy, precopy or hybrid)", s));
}

}  // namespace lazymig
