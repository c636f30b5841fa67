// handshake.hpp — Firecracker's UFFD handler handshake, as its VMM sends it
// (src/vmm/src/persist.rs, guest_memory_from_uffd): the VMM creates a userfaultfd
// (O_CLOEXEC | O_NONBLOCK, not user-mode-only, UFFD_FEATURE_EVENT_REMOVE), registers every
// guest region for MISSING faults, connects to the handler's Unix stream socket and sends
// one message: a JSON array of GuestRegionUffdMapping as data, the uffd as SCM_RIGHTS.
//
//   [{"base_host_virt_addr":140241036820480,"size":134217728,"offset":0,
//     "page_size":4096,"page_size_kib":4096}, ...]
//
// base_host_virt_addr: the region's address in the VMM; size: bytes; offset: where its
// bytes start in the snapshot memory file (regions are laid end to end); page_size:
// bytes (4 KiB, or 2 MiB with huge pages); page_size_kib: deprecated, holds the same
// bytes despite its name. The VMM then never writes to the socket again and keeps it
// open until it exits: its hangup is how the handler learns the VM is gone.
//
// receive_handshake() takes what a VMM sends and refuses, naming what and where: no fd,
// more than one fd, a fd that came late, text that is not the JSON above, a mapping that
// is unaligned, empty, outside user space, overlapping another, or not registered with a
// userfaultfd in the VMM (its VMAs in /proc/PID/smaps lack the "um" flag).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "fd.hpp"
#include "lazymig/error.hpp"

namespace uffd_handler {

struct Mapping {
    std::uint64_t base = 0;       // base_host_virt_addr
    std::uint64_t size = 0;
    std::uint64_t offset = 0;     // in the snapshot memory file
    std::uint64_t page_size = 0;
};

struct Handshake {
    std::vector<Mapping> mappings;
    vmm::UniqueFd uffd;
    pid_t pid = 0;  // the VMM (SO_PEERCRED)
};

inline constexpr std::size_t kMaxMappings = 64;  // lazymig takes at most 64 guest regions
inline constexpr std::size_t kMaxMessage = 1 << 20;

// Reads one handshake from the accepted connection `conn` within `timeout`. A receive
// that brings neither bytes nor a fd while the peer is still connected is retried, as
// Firecracker's own handlers do.
[[nodiscard]] lazymig::Result<Handshake> receive_handshake(int conn, std::chrono::milliseconds timeout);

// Parses and validates the JSON text (without the registration check, which needs the VMM).
[[nodiscard]] lazymig::Result<std::vector<Mapping>> parse_mappings(std::string_view json);

// Every byte of every mapping lies in VMAs of process `pid` registered for MISSING faults.
[[nodiscard]] lazymig::Result<void> check_registered(pid_t pid, const std::vector<Mapping>& mappings);

}  // namespace uffd_handler
