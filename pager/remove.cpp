// Reading the uffd's messages, and UFFD_EVENT_REMOVE for a handed-over userfaultfd
// (pager/placer.hpp, RemoveGate, says why both happen under one lock).
#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/log.hpp"

namespace lazymig::pager {

Result<std::size_t> Pager::read_batch() {
    if (!gate_) return uffd_.read_events(batch_);
    std::uint64_t done = 0;
    Result<std::size_t> got;
    {
        std::lock_guard lock(gate_->mu);
        got = uffd_.read_events(batch_);
        if (!got) return got;
        for (std::size_t i = 0; i < *got; ++i)
            if (batch_[i].kind == uffd::Event::Kind::remove) done += apply_remove(batch_[i]);
        ++gate_->epoch;
        gate_->cv.notify_all();
    }
    add_present(done);  // may complete the session: never under the gate
    return got;
}

// The VMM discarded [address, end): every page there reads zero from now on. Present
// pages go back to MISSING (the kernel zaps them once this message is read), and a
// page's next placement, whatever bytes arrive for it, is a zero page. A discarded page
// needs nothing from the source, so it counts as done (present_pages) from now on: a
// present one stays counted, one not yet placed is counted here, and its later zero
// placement adds nothing (PlaceOutcome::removed). Returns how many to add. REQUIRES: gate held.
std::uint64_t Pager::apply_remove(const uffd::Event& ev) {
    std::uint64_t removed = 0, were_present = 0, newly_done = 0;
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
        Region& r = regions_[ri];
        const auto base = reinterpret_cast<std::uint64_t>(r.guest.host);
        const std::uint64_t lo = std::max(ev.address, base), hi = std::min(ev.end, base + r.guest.size);
        if (lo >= hi) continue;
        const std::uint64_t first = (lo - base) / r.guest.page_size;
        const std::uint64_t end = (hi - base + r.guest.page_size - 1) / r.guest.page_size;
        for (std::uint64_t p = first; p < end; ++p) {
            const bool was_removed = r.removed[p / 64].fetch_or(1ull << (p % 64), std::memory_order_relaxed) >> (p % 64) & 1;
            if (r.state.get(p) == PageState::present) {
                if (r.state.make_missing(p)) ++were_present;
            } else if (!was_removed) {
                ++newly_done;
            }
        }
        removed += end - first;
        LZ_LOG(info, "pager_remove", "region={} first={} pages={} were_present={}", ri, first, end - first, were_present);
    }
    stats_.removed_pages.add(removed);
    return newly_done;
}

}  // namespace lazymig::pager
