// Reading the uffd's messages, and UFFD_EVENT_REMOVE for a handed-over userfaultfd
// (pager/placer.hpp, RemoveGate, says why both happen under one lock).
#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/log.hpp"

namespace lazymig::pager {

Result<std::size_t> Pager::read_batch() {
    if (!gate_) return uffd_.read_events(batch_);
    std::lock_guard lock(gate_->mu);
    auto got = uffd_.read_events(batch_);
    if (!got) return got;
    for (std::size_t i = 0; i < *got; ++i)
        if (batch_[i].kind == uffd::Event::Kind::remove) apply_remove(batch_[i]);
    ++gate_->epoch;
    gate_->cv.notify_all();
    return got;
}

// The VMM discarded [address, end): every page there reads zero from now on. Present
// pages go back to MISSING (the kernel zaps them once this message is read), and a
// page's next placement, whatever bytes arrive for it, is a zero page. REQUIRES: gate held.
void Pager::apply_remove(const uffd::Event& ev) {
    std::uint64_t removed = 0, were_present = 0;
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
        Region& r = regions_[ri];
        const auto base = reinterpret_cast<std::uint64_t>(r.guest.host);
        const std::uint64_t lo = std::max(ev.address, base), hi = std::min(ev.end, base + r.guest.size);
        if (lo >= hi) continue;
        const std::uint64_t first = (lo - base) / r.guest.page_size;
        const std::uint64_t end = (hi - base + r.guest.page_size - 1) / r.guest.page_size;
        for (std::uint64_t p = first; p < end; ++p) {
            r.removed[p / 64].fetch_or(1ull << (p % 64), std::memory_order_relaxed);
            const bool present = r.state.get(p) == PageState::present;
            if (present && r.state.make_missing(p)) ++were_present;
        }
        removed += end - first;
        LZ_LOG(info, "pager_remove", "region={} first={} pages={} were_present={}", ri, first, end - first, were_present);
    }
    present_.fetch_sub(were_present, std::memory_order_acq_rel);
    stats_.removed_pages.add(removed);
}

}  // namespace lazymig::pager
