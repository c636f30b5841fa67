// bench/floors.hpp — what this machine charges, measured in the same run as the figures.
//
// Each probe is one function that returns its figures as fields (or an `error` field).
// Probes fork and start threads, so the orchestrator runs each in its own child
// (run_in_child). Figures are what /work/shared/FLOORS.md lists:
//   tcp_rtt       loopback TCP request (16 B) / response (4 KiB), two processes, NODELAY
//   uffd_copy     userfaultfd MISSING fault on anonymous memory resolved by a handler
//                 thread with a 1-page UFFDIO_COPY: first touch → resumed, as the toucher sees it
//   uffd_continue the same for a memfd MINOR fault resolved by a 4 KiB write through a
//                 populated alias plus a 1-page UFFDIO_CONTINUE (lazymig's memfd path)
//   remote_fault  the whole demand path with plain syscalls and no library: a MISSING fault
//                 whose handler thread asks another process over loopback TCP (16 B) for
//                 the page (4 KiB) and places it with UFFDIO_COPY (information: what the
//                 composition of the two floors costs here)
//   tcp_stream    one loopback TCP stream, 1 MiB writes, received into a populated buffer
//   tcp_stream_cold  the same stream from a large written region into a large populated
//                 but untouched one, each page read and written once, as a migration must
//                 (information: where this machine charges a first touch of a page, this,
//                 not tcp_stream, bounds a single-threaded push)
//   pipeline      the raw kernel-copy pipeline a push can at best match: pread from a
//                 memfd whose pages were all written before into a reused 1 MiB buffer,
//                 send over one loopback TCP stream in 1 MiB sends, recv(MSG_WAITALL)
//                 into a reused buffer, pwrite into another fallocated memfd; the two
//                 ends in two processes
//   memcpy        one thread copying between populated buffers
#pragma once

#include <cstddef>

#include "bench/common.hpp"

namespace bench {

[[nodiscard]] Fields floor_tcp_rtt(int warmup, int iterations);      // rtt_{p50,p99,p999,mean}_us
[[nodiscard]] Fields floor_uffd_copy(int warmup, int pages);         // uffd_{p50,p99,p999,mean}_us
[[nodiscard]] Fields floor_uffd_continue(int warmup, int pages);     // uffd_minor_{p50,p99,p999,mean}_us
[[nodiscard]] Fields floor_remote_fault(int warmup, int pages);      // remote_{p50,p99,p999,mean}_us
[[nodiscard]] Fields floor_tcp_stream(std::size_t warmup_bytes, std::size_t bytes);  // tcp_gbps
[[nodiscard]] Fields floor_tcp_stream_cold(std::size_t bytes);      // tcp_cold_gbps
[[nodiscard]] Fields floor_pipeline(std::size_t bytes);              // pipeline_gbps
[[nodiscard]] Fields floor_memcpy(std::size_t bytes, int passes);    // memcpy_gbps

// Loopback TCP helpers shared with nothing else; exit the process on failure (probes only).
[[nodiscard]] int tcp_listen_loopback(int* port);
[[nodiscard]] int tcp_connect_loopback(int port);

}  // namespace bench
