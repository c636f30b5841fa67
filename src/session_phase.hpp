// session_phase.hpp — the session state machine: every phase a migration can be in and
// every move between them, in one place. Source and Destination both follow it; a move
// not drawn here is a bug and is refused (logged, and the phase stays).
//
//   idle ──► setup ──► precopy ──► switchover ──► postcopy ──► completed
//              │                     ▲   │           │  ▲
//              └─────────────────────┘   │           ▼  │
//              (postcopy mode: no rounds)│         paused ──► recovering
//                                        │           ▲            │
//                                        │           └────────────┘ (a second failure)
//                                        └──► completed (precopy mode: stop-and-copy)
//   setup, precopy, switchover, postcopy, paused, recovering ──► failed | cancelled
//
// What each phase means:
//   idle        created; migrate() not called / destination listening
//   setup       channels opening, handshake, region table
//   precopy     iterative rounds while the VM runs at the source (precopy, hybrid)
//   switchover  source vCPUs paused; final dirty set and device state moving
//   postcopy    the VM runs at the destination; pages arrive on demand and by push
//   paused      post-copy, the link is lost (an error of class transport_lost): both
//               sides keep every page and all state and wait for recover()
//   recovering  reconnecting and re-requesting what was in flight; back to postcopy
//   completed, failed, cancelled: terminal
// precopy is reached in modes precopy and hybrid (precopy/precopy.hpp); a precopy that
// cannot converge goes precopy → failed with the VM still at the source. paused and
// recovering: post-copy over TCP, on an error of class transport_lost or pause(); see
// "Link loss: pause and recover" in src/api/source.cpp and src/api/destination.cpp,
// and the resume handshake in src/protocol.hpp. A paused side that waits longer than
// Parameters::recover_timeout goes paused → failed (cancel(): → cancelled).
#pragma once

#include "lazymig/lazymig.hpp"

namespace lazymig {

[[nodiscard]] constexpr bool terminal(Phase p) noexcept {
    return p == Phase::completed || p == Phase::failed || p == Phase::cancelled;
}

[[nodiscard]] constexpr bool transition_allowed(Phase from, Phase to) noexcept {
    if (terminal(from) || from == Phase::invalid || to == Phase::invalid || to == Phase::idle) return false;
    if (to == Phase::failed || to == Phase::cancelled) return true;
    switch (from) {
    case Phase::idle: return to == Phase::setup;
    case Phase::setup: return to == Phase::precopy || to == Phase::switchover;
    case Phase::precopy: return to == Phase::switchover;
    case Phase::switchover: return to == Phase::postcopy || to == Phase::completed;
    case Phase::postcopy: return to == Phase::paused || to == Phase::completed;
    case Phase::paused: return to == Phase::recovering;
    case Phase::recovering: return to == Phase::postcopy || to == Phase::paused;
    default: return false;
    }
}

}  // namespace lazymig
