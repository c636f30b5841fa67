// region.hpp — checks on the guest regions a VMM hands over.
#pragma once

#include <span>

#include "lazymig/lazymig.hpp"

namespace lazymig {

// Every region: non-null, page-aligned, a power-of-two page size, a whole number of
// pages, a known backing, a file for memfd; names unique and at most 255 bytes. The
// error names the side, the region and the problem.
[[nodiscard]] Result<void> validate_regions(std::span<const GuestRegion> regions, std::string_view side);

}  // namespace lazymig
