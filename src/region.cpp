#include "src/region.hpp"

#include <fmt/format.h>

namespace lazymig {

Result<void> validate_regions(std::span<const GuestRegion> regions, std::string_view side) {
    if (regions.empty()) return logic_error(fmt::format("{}: no guest regions configured", side));
    if (regions.size() > 64) return logic_error(fmt::format("{}: {} guest regions (at most 64)", side, regions.size()));
    for (std::size_t i = 0; i < regions.size(); ++i) {
        const auto& r = regions[i];
        auto bad = [&](std::string_view what) {
            return logic_error(fmt::format("{} region {} '{}': {}", side, i, r.name, what));
        };
        if (r.name.empty() || r.name.size() > 255) return bad("name must be 1 to 255 bytes");
        for (std::size_t j = 0; j < i; ++j)
            if (regions[j].name == r.name) return bad(fmt::format("name repeats region {}", j));
        if (r.host == nullptr) return bad("host address is null");
        if (r.page_size < 4096 || (r.page_size & (r.page_size - 1)) != 0)
            return bad(fmt::format("page size {} is not a power of two of at least 4096", r.page_size));
        if (reinterpret_cast<std::uintptr_t>(r.host) % r.page_size != 0)
            return bad(fmt::format("host address {} is not aligned to its page size", r.host));
        if (r.size == 0 || r.size % r.page_size != 0)
            return bad(fmt::format("size {} is not a positive multiple of the page size {}", r.size, r.page_size));
        if (r.backing == Backing::invalid) return bad("backing is invalid");
        if (r.backing == Backing::memfd && r.fd < 0) return bad("memfd backing needs the file descriptor (fd)");
        if (r.backing == Backing::anon && r.fd >= 0) return bad("anon backing must not name a file descriptor");
    }
    return {};
}

}  // namespace lazymig
