// lazymig/error.hpp — errors as values.
//
// Every fallible call in lazymig returns lazymig::Result<T> (std::expected):
//
//   auto uffd = lazymig::uffd::Uffd::open(wanted);
//   if (!uffd) { log(uffd.error().message()); return; }
//
// An Error keeps the errno (0 when the failure is not a syscall's) apart from the
// context that says what was being done and where, so a caller can both branch on
// the errno (EEXIST, EAGAIN, ...) and show a person a sentence that needs no source.
#pragma once

#include <cerrno>
#include <cstring>
#include <expected>
#include <string>
#include <utility>

namespace lazymig {

struct Error {
    int code = 0;          // errno of the failing call, 0 for a logical error
    std::string context;   // "UFFDIO_COPY dst=0x7f.. len=4096", "handshake on urgent channel: ..."

    // The sentence for a person: context, then strerror when there is an errno.
    [[nodiscard]] std::string message() const {
        if (code == 0) return context;
        return context + ": " + std::strerror(code) + " (errno " + std::to_string(code) + ")";
    }

    // Prepends outer context: "destination: " + "handshake: ..." keeps the chain readable.
    [[nodiscard]] Error wrap(std::string_view outer) const {
        return Error{code, std::string(outer) + ": " + context};
    }
};

template <class T = void>
using Result = std::expected<T, Error>;

// Captures errno on the failing line: `return sys_error("mmap guest RAM");`
[[nodiscard]] inline std::unexpected<Error> sys_error(std::string context, int code = errno) {
    return std::unexpected(Error{code, std::move(context)});
}

// A failure that is not a syscall's: bad configuration, a bad peer.
[[nodiscard]] inline std::unexpected<Error> logic_error(std::string context) {
    return std::unexpected(Error{0, std::move(context)});
}

}  // namespace lazymig
