// log.hpp — one structured line per state transition: `module_event key=value ...`.
//
//   LZ_LOG(info, "pager_complete", "pages={} ms={:.1f}", n, ms);
//   → lazymig 1234 12.345678 info pager_complete pages=262144 ms=812.3
//
// The level comes from LAZYMIG_LOG (error, warn, info, debug; default warn) and can be
// changed with log::set_level. Lines go to stderr in one write each.
#pragma once

#include <fmt/format.h>

#include <string_view>

namespace lazymig::log {

enum class Level : int { error = 0, warn = 1, info = 2, debug = 3 };

[[nodiscard]] bool enabled(Level l) noexcept;
void set_level(Level l) noexcept;
void emit(Level l, std::string_view event, std::string_view text) noexcept;

}  // namespace lazymig::log

#define LZ_LOG(level, event, ...)                                                        \
    do {                                                                                 \
        if (::lazymig::log::enabled(::lazymig::log::Level::level))                       \
            ::lazymig::log::emit(::lazymig::log::Level::level, event, fmt::format(__VA_ARGS__)); \
    } while (0)
