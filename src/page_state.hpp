// page_state.hpp — one atomic byte per guest page, the destination's source of truth.
//
//   MISSING ──fault──► REQUESTED ──claim──► PLACING ──set_present──► PRESENT
//    │  ▲                   ▲                 │  ▲                         │
//    │  │                   └─────unclaim─────┘  │                         │
//    │  │                          set_staged ▼  │ claim (a newer copy,    │
//    │  │                                   STAGED      or the map step)   │
//    │  │                                      │                           │
//    │  └──────── make_missing (stale) ────────┴───────────────────────────┘
//    └──claim (a copy arrived before any fault)──► PLACING
//
//   MISSING    nothing here; a guest access faults (MISSING fault for anonymous memory,
//              MINOR fault for a file: its page cache page is zero or stale).
//   REQUESTED  a fault asked the source for it; the reply will be placed.
//   PLACING    one thread owns it and is writing/mapping it right now.
//   STAGED     its bytes are in the file's page cache but not mapped into the guest
//              (pre-copy data for file-backed memory); mapping it needs no network, only
//              UFFDIO_CONTINUE (claim it, map, set_present).
//   PRESENT    mapped into the guest; the guest may have written it since.
//
// A fault and a pushed or demanded copy of the same page race here and nowhere else:
// exactly one claim() wins and places the page; the loser counts a duplicate. Threads
// blocked on the page are woken by the winner's UFFDIO_COPY/CONTINUE. 0 is MISSING so
// a fresh (zeroed) table says "nothing arrived yet".
//
// make_missing() is the way back for stale pages (the hybrid mode: a page found dirty
// on the source after it was sent). The table only records it; the memory must fault
// again, which is the caller's job, in this order, with the vCPUs paused and no
// placement of those pages in flight:
//   1. zap the guest mapping of the range: madvise(MADV_DONTNEED). For a file (memfd,
//      hugetlbfs) this only drops the PTEs — the page cache keeps the stale bytes and
//      the next access is a MINOR fault again; for anonymous memory it frees the page
//      and the next access is a MISSING fault. (Pager::make_missing does both steps.)
//   2. make_missing(). Marking first would let a vCPU that touches the still-mapped
//      page read stale bytes, and an anonymous UFFDIO_COPY would fail with EEXIST and
//      count the stale page as placed.
// A zapped page still PRESENT in the table would make its fault spin (fault → "present"
// → wake → fault again): hence "vCPUs paused" until step 2.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace lazymig {

enum class PageState : std::uint8_t { missing = 0, requested = 1, placing = 2, present = 3, staged = 4 };

class PageStateTable {
public:
    PageStateTable() = default;
    explicit PageStateTable(std::size_t pages)
        : pages_(pages), states_(std::make_unique<std::atomic<std::uint8_t>[]>(pages)) {}

    [[nodiscard]] std::size_t size() const { return pages_; }
    [[nodiscard]] std::size_t bytes() const { return pages_; }

    [[nodiscard]] PageState get(std::size_t i) const {
        return PageState{states_[i].load(std::memory_order_acquire)};
    }
    // MISSING → REQUESTED; false if someone else already requested, claimed, staged or
    // placed it.
    [[nodiscard]] bool mark_requested(std::size_t i) {
        auto expected = static_cast<std::uint8_t>(PageState::missing);
        return states_[i].compare_exchange_strong(expected, static_cast<std::uint8_t>(PageState::requested),
                                                  std::memory_order_acq_rel);
    }
    // MISSING, REQUESTED or STAGED → PLACING: the caller now owns writing and mapping
    // this page. A STAGED page is claimed to map it, or to overwrite it with a newer copy.
    [[nodiscard]] bool claim(std::size_t i) {
        auto s = states_[i].load(std::memory_order_acquire);
        while (claimable(s)) {
            if (states_[i].compare_exchange_weak(s, static_cast<std::uint8_t>(PageState::placing),
                                                 std::memory_order_acq_rel))
                return true;
        }
        return false;
    }
    // STAGED → PLACING only: for the map step, which has no bytes to offer a missing page.
    [[nodiscard]] bool claim_staged(std::size_t i) {
        auto expected = static_cast<std::uint8_t>(PageState::staged);
        return states_[i].compare_exchange_strong(expected, static_cast<std::uint8_t>(PageState::placing),
                                                  std::memory_order_acq_rel);
    }
    // PLACING → PRESENT. seq_cst, not only release (the page's bytes are visible before
    // the state): the blocktime table pairs this store with a later load of its own, and
    // a fault thread that publishes a waiter and then loads this state must not miss both.
    void set_present(std::size_t i) {
        states_[i].store(static_cast<std::uint8_t>(PageState::present), std::memory_order_seq_cst);
    }
    // PLACING → STAGED: bytes written into the file, not mapped.
    void set_staged(std::size_t i) {
        states_[i].store(static_cast<std::uint8_t>(PageState::staged), std::memory_order_release);
    }
    // PLACING → back to REQUESTED when a placement failed; the page will be fetched again.
    void unclaim(std::size_t i) {
        states_[i].store(static_cast<std::uint8_t>(PageState::requested), std::memory_order_release);
    }
    // PRESENT or STAGED → MISSING: the page is stale. False when it was in another state
    // (already missing, or requested/being placed: its in-flight copy decides).
    // REQUIRES: see the header comment — for PRESENT, the guest mapping is zapped first.
    [[nodiscard]] bool make_missing(std::size_t i) {
        auto s = states_[i].load(std::memory_order_acquire);
        while (s == static_cast<std::uint8_t>(PageState::present) || s == static_cast<std::uint8_t>(PageState::staged)) {
            if (states_[i].compare_exchange_weak(s, static_cast<std::uint8_t>(PageState::missing),
                                                 std::memory_order_acq_rel))
                return true;
        }
        return false;
    }

private:
    static bool claimable(std::uint8_t s) {
        return s == static_cast<std::uint8_t>(PageState::missing) || s == static_cast<std::uint8_t>(PageState::requested) ||
               s == static_cast<std::uint8_t>(PageState::staged);
    }
    std::size_t pages_ = 0;
    std::unique_ptr<std::atomic<std::uint8_t>[]> states_;
};

}  // namespace lazymig
