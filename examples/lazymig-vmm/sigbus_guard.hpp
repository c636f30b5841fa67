// sigbus_guard.hpp — a touch of a poisoned guest page becomes an error, not a crash.
//
// When a post-copy migration fails after the destination resumed, lazymig poisons the
// pages that never arrived: touching one raises SIGBUS (it never reads zeroes). A VMM
// must stop that vCPU (as a KVM VMM reports a memory error) and keep serving its
// management socket. run_guarded() runs guest work on the calling thread; if the work
// touches a poisoned page, the signal handler jumps back out of it and the address is
// returned. SIGBUS outside run_guarded() keeps its default action (the process dies).
//
// REQUIRES of the guarded work: no locks held and nothing that needs unwinding when
// it touches guest RAM — its frames are abandoned, not unwound (siglongjmp).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

namespace vmm {

// Once, before any thread starts.
void install_sigbus_handler();
// The host address of the poisoned byte `work` touched, or nothing if it returned.
[[nodiscard]] std::optional<std::uintptr_t> run_guarded(const std::function<void()>& work);

}  // namespace vmm
