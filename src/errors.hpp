// errors.hpp — building errors inside the library.
//
// errno must be read on the failing line, before anything else can change it: the
// message is built with fmt::format, which allocates, and an allocation may set errno.
// The order in which a call's arguments are evaluated is unspecified, so
// `sys_error(fmt::format(...))` with its default `errno` argument may read errno after
// the format. LZ_SYS_ERROR reads it first and builds the message afterwards:
//
//   if (::fallocate(fd, 0, off, len) != 0) return LZ_SYS_ERROR("{}: fallocate {} bytes", where, len);
#pragma once

#include <fmt/format.h>

#include "lazymig/error.hpp"

namespace lazymig::detail {

template <class Make>
[[nodiscard]] std::unexpected<Error> sys_error_then(int code, Make&& make) {
    return std::unexpected(Error{code, make()});
}

}  // namespace lazymig::detail

#define LZ_SYS_ERROR(...) ::lazymig::detail::sys_error_then(errno, [&] { return fmt::format(__VA_ARGS__); })
