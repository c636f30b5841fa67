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
#include <cstdint>
#include <cstring>
#include <expected>
#include <string>
#include <utility>

namespace lazymig {

// What a caller does about an error. The class travels with the error from the line
// that detected it to the C ABI; it never collapses into a generic code on the way.
enum class ErrorClass : std::uint8_t {
    invalid = 0,
    local = 1,           // this host: a syscall, a resource, a bad argument. Fatal; errno says why.
    transport_lost = 2,  // the link to the peer broke or went silent. Recoverable: pause and wait.
    peer_violation = 3,  // the peer sent something it must not (bad frame, wrong table). Fatal.
};
[[nodiscard]] constexpr const char* to_string(ErrorClass c) noexcept {
    switch (c) {
    case ErrorClass::local: return "local";
    case ErrorClass::transport_lost: return "transport-lost";
    case ErrorClass::peer_violation: return "peer-violation";
    default: return "invalid";
    }
}

struct Error {
    int code = 0;          // errno of the failing call, 0 for a logical error
    std::string context;   // "UFFDIO_COPY dst=0x7f.. len=4096", "handshake on urgent channel: ..."
    ErrorClass kind = ErrorClass::local;

    // The sentence for a person: context, then strerror when there is an errno.
    [[nodiscard]] std::string message() const {
        if (code == 0) return context;
        return context + ": " + std::strerror(code) + " (errno " + std::to_string(code) + ")";
    }

    // Prepends outer context: "destination: " + "handshake: ..." keeps the chain readable.
    [[nodiscard]] Error wrap(std::string_view outer) const {
        return Error{code, std::string(outer) + ": " + context, kind};
    }
};

template <class T = void>
using Result = std::expected<T, Error>;

// Captures errno on the failing line: `return sys_error("mmap guest RAM");`
// When the context is built with a call that may itself touch errno (fmt::format
// allocates), capture errno first: `const int e = errno; return sys_error(fmt::format(..), e);`
// — the order in which a default argument and the other arguments are evaluated is
// unspecified.
[[nodiscard]] inline std::unexpected<Error> sys_error(std::string context, int code = errno) {
    return std::unexpected(Error{code, std::move(context)});
}

// The link to the peer broke (reset, EOF mid-frame, silence past a deadline).
[[nodiscard]] inline std::unexpected<Error> transport_error(std::string context, int code) {
    return std::unexpected(Error{code, std::move(context), ErrorClass::transport_lost});
}

// The peer broke the protocol: names what it sent and where.
[[nodiscard]] inline std::unexpected<Error> peer_violation(std::string context) {
    return std::unexpected(Error{0, std::move(context), ErrorClass::peer_violation});
}

// A failure that is not a syscall's: bad configuration, a bad peer.
[[nodiscard]] inline std::unexpected<Error> logic_error(std::string context) {
    return std::unexpected(Error{0, std::move(context)});
}

}  // namespace lazymig
