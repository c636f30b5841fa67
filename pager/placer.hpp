// pager/placer.hpp — putting arrived pages into guest memory, independent of the wire.
//
//   Placer placer(uffd, regions, observer);
//   auto got = placer.place(0, first, count, ZeroBits{bitmap}, staging);  // any thread
//
// File-backed memory (memfd, hugetlbfs; registered for MINOR faults): the non-zero
// pages' bytes go into the file with one pwritev per contiguous run (hugetlbfs has no
// write(2): there they are copied through a populated 2 MiB alias mapping, one fault per
// huge page paid at set-up), then one UFFDIO_CONTINUE maps each run of claimed pages —
// zero and non-zero together — and wakes the threads blocked on them. The file was made
// fresh by Pager::create (every page reads zero), so a zero page needs no write unless
// its file page may hold data: a bit per page, set when the page is written or mapped
// (once mapped the guest may write it) and kept when the page goes back to MISSING.
//
// Anonymous memory (registered for MISSING faults): UFFDIO_COPY for runs of non-zero
// pages, UFFDIO_ZEROPAGE for runs of zero pages (hugetlb: COPY from a zero huge page).
//
// Why: on this machine (shared/FLOORS.md) memcpy into a user mapping of the file costs
// 7.9 µs a page, pwrite from a reused buffer runs at 8.6 GB/s and CONTINUE of 64/512
// pages per ioctl at 30/36 GB/s. Bytes move through the kernel, in runs.
//
// Claiming: pages are claimed in the page-state table (MISSING/REQUESTED/STAGED →
// PLACING) a chunk at a time, written, mapped and set PRESENT, so a vCPU faulting on a
// page of a large frame waits for its chunk, not the whole frame. A page that is not
// claimed (present, or another thread is placing it) is a duplicate: not written, not
// mapped — a present page may hold the guest's newer writes and must never be touched.
//
// Threads: place(), stage() and map_staged() may run concurrently on any threads; the
// page-state table decides who places a page. The observer is called on those threads.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "lazymig/lazymig.hpp"
#include "src/page_state.hpp"
#include "src/stats.hpp"
#include "uffd/uffd.hpp"

namespace lazymig::pager {

// One guest region as the destination sees it.
struct Region {
    GuestRegion guest;
    std::size_t pages = 0;
    // hugetlbfs only: a populated writable second mapping of the file (no write(2) there).
    std::byte* alias = nullptr;
    PageStateTable state;
    // File-backed: bit p set = the file page of page p may hold non-zero bytes.
    std::unique_ptr<std::atomic<std::uint64_t>[]> may_hold_data;
    // Microseconds since the pager's epoch at which a fault on the page was first seen
    // (0 = none); read back when the page is placed, for the fault-latency histogram.
    std::unique_ptr<std::atomic<std::uint32_t>[]> fault_at;
    // Prefetch trend, touched only by the fault thread.
    std::uint64_t last_fault = ~0ull;
    std::uint32_t window = 1;

    [[nodiscard]] bool file_backed() const { return guest.fd >= 0; }
    [[nodiscard]] std::byte* host(std::uint64_t page) const {
        return static_cast<std::byte*>(guest.host) + page * guest.page_size;
    }
    // Adopted uffd with EVENT_REMOVE only: bit p set = the VMM discarded page p
    // (MADV_DONTNEED, a balloon): from then on it is placed as a zero page, whatever arrives.
    std::unique_ptr<std::atomic<std::uint64_t>[]> removed;
    [[nodiscard]] bool test_removed(std::uint64_t p) const {
        return removed && (removed[p / 64].load(std::memory_order_relaxed) >> (p % 64) & 1);
    }
    [[nodiscard]] bool test_data_bit(std::uint64_t p) const {
        return may_hold_data[p / 64].load(std::memory_order_relaxed) >> (p % 64) & 1;
    }
    void set_data_bit(std::uint64_t p) {
        may_hold_data[p / 64].fetch_or(1ull << (p % 64), std::memory_order_relaxed);
    }
};

// Orders placement against UFFD_EVENT_REMOVE when the guest memory belongs to another
// process that may discard pages (MADV_DONTNEED) at any time. The kernel zaps a removed
// range only after the REMOVE message has been read, and a UFFDIO_COPY issued between
// that read and the zap lands and is then zapped, but one issued after the zap maps the
// old bytes into a page the VMM gave away. So the fault thread reads every batch of
// messages and marks removed ranges while holding `mu`, and each placement checks the
// removed bits and issues its ioctl (and sets its pages present) under `mu` too: a copy
// either precedes the read (and is zapped after it, or fails with EAGAIN while the event
// is pending) or sees the bits. `epoch` counts batches read; a placement that got EAGAIN
// waits for it to move (bounded), since only the fault thread's read lets it go on.
struct RemoveGate {
    std::mutex mu;
    std::condition_variable cv;
    std::uint64_t epoch = 0;
};

// Which pages of a run are zero: bit i (least significant first within byte i/8) for
// page first+i — the layout of the wire's PAGES bitmap, but any bytes will do.
struct ZeroBits {
    std::span<const std::uint8_t> bits;
    [[nodiscard]] bool operator[](std::uint32_t i) const { return bits[i / 8] >> (i % 8) & 1; }
};

// What one call did.
struct PlaceOutcome {
    std::uint64_t placed = 0;      // pages this call made present (or staged, for stage())
    std::uint64_t duplicates = 0;  // pages someone else had placed or was placing
    std::uint64_t zeros = 0;       // of `placed`, zero pages
    std::uint64_t removed = 0;     // of `placed`, pages the VMM had discarded (RemoveGate): zero
                                   // pages, already counted as done when the REMOVE was read
};

// Counters for tests and benchmarks: what reached the kernel.
struct PlacerCounters {
    Counter write_calls;       // pwritev calls (or alias copies, hugetlbfs)
    Counter bytes_written;     // bytes of non-zero pages written into files
    Counter zero_bytes_written;  // bytes of zero pages written (their file page may hold data)
    Counter map_calls;         // UFFDIO_CONTINUE / COPY / ZEROPAGE ioctls
};

// Told about every run that became present, on the thread that placed it.
class PlaceObserver {
public:
    virtual ~PlaceObserver() = default;
    // Pages [first, first+count) of region `ri` are present; their threads were woken by
    // an ioctl issued just after `at_us` (the pager's clock).
    virtual void placed(Region& r, std::uint32_t ri, std::uint64_t first, std::uint64_t count, std::uint32_t at_us) = 0;
    [[nodiscard]] virtual std::uint32_t now_us() const = 0;
};

class Placer {
public:
    // Claim granularity in pages. 64 keeps a vCPU's wait behind a pushed 4 MiB frame to
    // its chunk's pwritev + CONTINUE. Measured with bench/placer_chunks.cpp (256 MiB memfd,
    // 1024-page frames, machine loaded by other builds): 64/128/256/512/1024 pages gave
    // 1.71/1.56/1.88/2.18/1.23 GB/s in one run and 0.98/0.97/1.05/1.01/0.98 in another —
    // no gain beyond noise from bigger runs, while the wait per chunk grows with its size
    // (150-270 µs at 64 pages, 1-2 ms at 512). The pwritev, not the CONTINUE, dominates.
    static constexpr std::uint32_t kDefaultChunk = 64;

    // REQUIRES: `regions` and `observer` outlive the Placer; `zero_page` holds at least
    // the largest page size of zero bytes and is populated.
    Placer(uffd::Uffd& uffd, std::span<Region> regions, PlaceObserver& observer, std::span<const std::byte> zero_page,
           std::uint32_t chunk = kDefaultChunk);
    // Orders placement against REMOVE events (see RemoveGate). REQUIRES: before any placement.
    void set_remove_gate(RemoveGate* gate) { gate_ = gate; }
    // Back-replication: from now on pages are mapped write-protected (UFFDIO_COPY_MODE_WP,
    // UFFDIO_CONTINUE_MODE_WP), so that the guest's first write to each is recorded by
    // WP_ASYNC. REQUIRES: every region registered in mode WP. A zero page
    // (UFFDIO_ZEROPAGE, which has no WP mode) maps read-only without the uffd-wp bit: the
    // next scan reports it as written once (it is sent, as zeroes) and protects it.
    void set_write_protect(bool on) { wp_.store(on, std::memory_order_release); }

    // Places pages [first, first+count) of region `ri`. `data` holds the non-zero pages
    // back to back, in order; zero pages are flagged in `zero`. On failure the claims of
    // the pages not yet placed are handed back (REQUESTED), so a failure path can still
    // poison them; pages placed before the failure stay present.
    // REQUIRES: count <= 1024 (a frame), the range inside the region.
    [[nodiscard]] Result<PlaceOutcome> place(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                             const std::byte* data);
    // File-backed only: writes the pages into the file and leaves them STAGED (not mapped;
    // pre-copy data). A later place() of a page overwrites it; map_staged() maps it.
    [[nodiscard]] Result<PlaceOutcome> stage(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                                             const std::byte* data);
    // For a transport that writes page bytes itself (RDMA READ): pages [first,
    // first+count), every one claimed (PLACING) by the caller, are mapped and set PRESENT.
    // File-backed: their bytes are in the file already (one CONTINUE per run). Anonymous:
    // page first+i is at data + i*page_size unless `zero` flags it (COPY / ZEROPAGE per
    // run). On failure the pages not yet mapped are unclaimed (REQUESTED).
    [[nodiscard]] Result<std::uint64_t> map_claimed(std::uint32_t ri, std::uint64_t first, std::uint32_t count,
                                                    ZeroBits zero, const std::byte* data);
    // Maps the STAGED pages of [first, first+count) with one UFFDIO_CONTINUE per run;
    // other pages are left alone. Returns how many became present.
    [[nodiscard]] Result<std::uint64_t> map_staged(std::uint32_t ri, std::uint64_t first, std::uint64_t count);

    [[nodiscard]] const PlacerCounters& counters() const { return counters_; }
    [[nodiscard]] std::uint32_t chunk() const { return chunk_; }
    // For benchmarks: REQUIRES no placement running or started before.
    void set_chunk(std::uint32_t pages) { chunk_ = std::clamp<std::uint32_t>(pages, 1, 1024); }

private:
    enum class End { present, staged };
    Result<PlaceOutcome> put(std::uint32_t ri, std::uint64_t first, std::uint32_t count, ZeroBits zero,
                             const std::byte* data, End end);
    Result<void> write_runs(Region& r, std::uint64_t first, std::uint32_t n, const bool* mine, ZeroBits zero,
                            std::uint32_t zero_base, const std::byte* data);
    Result<void> write_file(Region& r, std::uint64_t page, std::span<iovec> iov, std::size_t bytes);
    Result<void> map_run(Region& r, std::uint64_t first, std::uint64_t count, bool zero, const std::byte* data,
                         std::unique_lock<std::mutex>* gated = nullptr);

    uffd::Uffd& uffd_;
    std::span<Region> regions_;
    PlaceObserver& observer_;
    std::span<const std::byte> zero_page_;
    std::uint32_t chunk_;
    PlacerCounters counters_;
    RemoveGate* gate_ = nullptr;
    std::atomic<bool> wp_{false};
};

}  // namespace lazymig::pager
