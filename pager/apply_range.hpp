// pager/apply_range.hpp — one loop for every range ioctl the pager issues (internal).
#pragma once

#include <cerrno>
#include <cstdint>
#include <string_view>

#include <fmt/format.h>

#include "lazymig/error.hpp"
#include "uffd/uffd.hpp"

namespace lazymig::pager::detail {

// Applies a range ioctl over [0, len), stepping over pages that turn out to be mapped
// already (EEXIST: someone else placed them; they count as present) and resuming after
// partial progress. A pending mapping change (EAGAIN with nothing done) is retried a
// bounded number of times: with no REMOVE/UNMAP events enabled it does not persist.
template <class Op>
Result<void> apply_range(Op op, std::size_t len, std::size_t page, std::string_view what, std::byte* base) {
    std::size_t off = 0;
    int again = 0;
    while (off < len) {
        const uffd::IoctlOutcome o = op(off, len - off);
        if (o.ok()) return {};
        off += o.done;
        if (o.err == EEXIST) {
            off += page;
        } else if (o.err == EAGAIN) {
            if (o.done == 0 && ++again > 1000)
                return sys_error(fmt::format("{} {:#x}: a mapping change stays pending", what,
                                             reinterpret_cast<std::uintptr_t>(base + off)), EAGAIN);
        } else {
            return sys_error(fmt::format("{} {:#x}+{}", what, reinterpret_cast<std::uintptr_t>(base + off), len - off),
                             o.err);
        }
    }
    return {};
}

}  // namespace lazymig::pager::detail
