// page_state.hpp — one atomic byte per guest page, the destination's source of truth.
//
//   MISSING ──fault──► REQUESTED ──claim──► PLACING ──placed──► PRESENT
//      └──────────────────claim (push arrived first)──┘
//
// A fault and a pushed or demanded copy of the same page race here and nowhere else:
// exactly one claim() wins and places the page; the loser counts a duplicate. Threads
// blocked on the page are woken by the winner's UFFDIO_COPY/CONTINUE. 0 is MISSING so
// a fresh (zeroed) table says "nothing arrived yet".
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace lazymig {

enum class PageState : std::uint8_t { missing = 0, requested = 1, placing = 2, present = 3 };

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
    // MISSING → REQUESTED; false if someone else already requested, claimed or placed it.
    [[nodiscard]] bool mark_requested(std::size_t i) {
        auto expected = static_cast<std::uint8_t>(PageState::missing);
        return states_[i].compare_exchange_strong(expected, static_cast<std::uint8_t>(PageState::requested),
                                                  std::memory_order_acq_rel);
    }
    // MISSING or REQUESTED → PLACING: the caller now owns placing this page.
    [[nodiscard]] bool claim(std::size_t i) {
        auto s = states_[i].load(std::memory_order_acquire);
        while (s == static_cast<std::uint8_t>(PageState::missing) ||
               s == static_cast<std::uint8_t>(PageState::requested)) {
            if (states_[i].compare_exchange_weak(s, static_cast<std::uint8_t>(PageState::placing),
                                                 std::memory_order_acq_rel))
                return true;
        }
        return false;
    }
    // PLACING → PRESENT (release: the page's bytes are visible before the state).
    void set_present(std::size_t i) {
        states_[i].store(static_cast<std::uint8_t>(PageState::present), std::memory_order_release);
    }
    // PLACING → back to REQUESTED when a placement failed; the page will be fetched again.
    void unclaim(std::size_t i) {
        states_[i].store(static_cast<std::uint8_t>(PageState::requested), std::memory_order_release);
    }

private:
    std::size_t pages_ = 0;
    std::unique_ptr<std::atomic<std::uint8_t>[]> states_;
};

}  // namespace lazymig
