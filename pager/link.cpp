// Recovery: the fault thread's link is handed over (detached while the link is down,
// attached when recover() opened a new one), and the page-state table says what is
// still lacking and what was asked for. See Pager in pager/pager.hpp.
#include <unistd.h>

#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/log.hpp"

namespace lazymig::pager {
namespace {

Result<void> hand_over(std::mutex& mu, std::condition_variable& cv, net::Outbox*& next, std::uint64_t& gen,
                       const std::uint64_t& seen, const bool& done, int wake_fd, net::Outbox* out,
                       std::chrono::milliseconds limit) {
    std::unique_lock lock(mu);
    next = out;
    const std::uint64_t want = ++gen;
    const std::uint64_t one = 1;
    if (::write(wake_fd, &one, sizeof one) != sizeof one)
        return sys_error("pager: waking the fault thread for a link handover", errno);
    if (!cv.wait_for(lock, limit, [&] { return seen >= want || done; }))
        return std::unexpected(Error{ETIMEDOUT, fmt::format("pager: the fault thread did not take the link handover "
                                                            "within {} ms", limit.count())});
    return {};
}

}  // namespace

Result<void> Pager::detach_outbox(std::chrono::milliseconds limit) {
    if (!thread_.joinable()) {
        outbox_ = nullptr;
        return {};
    }
    return hand_over(link_mu_, link_cv_, next_outbox_, link_gen_, link_seen_, fault_thread_done_, wake_fd_.get(),
                     nullptr, limit);
}

Result<void> Pager::attach_outbox(net::Outbox& out, std::chrono::milliseconds limit) {
    if (!thread_.joinable()) {
        outbox_ = &out;
        return {};
    }
    return hand_over(link_mu_, link_cv_, next_outbox_, link_gen_, link_seen_, fault_thread_done_, wake_fd_.get(), &out,
                     limit);
}

std::vector<proto::PageRequest> Pager::requested_runs() const {
    std::vector<proto::PageRequest> out;
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
        const Region& r = regions_[ri];
        for (std::uint64_t p = 0; p < r.pages;) {
            if (r.state.get(p) != PageState::requested) {
                ++p;
                continue;
            }
            std::uint64_t end = p + 1;
            while (end < r.pages && end - p < proto::kMaxPagesPerFrame && r.state.get(end) == PageState::requested) ++end;
            out.push_back({.region = ri, .count = static_cast<std::uint32_t>(end - p), .first = p});
            p = end;
        }
    }
    return out;
}

std::vector<proto::StaleRun> Pager::lacking_runs() const {
    auto lacking = [](PageState s) { return s != PageState::present && s != PageState::staged; };
    std::vector<proto::StaleRun> out;
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
        const Region& r = regions_[ri];
        for (std::uint64_t p = 0; p < r.pages;) {
            if (!lacking(r.state.get(p)) || r.test_removed(p)) {
                ++p;
                continue;
            }
            std::uint64_t end = p + 1;
            while (end < r.pages && end - p < UINT32_MAX && lacking(r.state.get(end)) && !r.test_removed(end)) ++end;
            out.push_back({.region = ri, .count = static_cast<std::uint32_t>(end - p), .first = p});
            p = end;
        }
    }
    return out;
}

}  // namespace lazymig::pager
