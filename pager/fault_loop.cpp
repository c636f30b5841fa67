// The fault thread: the one place where a vCPU's missing page turns into a request.
//
// It blocks in one place, poll(): on the stop eventfd, the uffd and — while the outbox
// holds unsent bytes — POLLOUT on the urgent channel. It never blocks on a send: a
// request the outbox cannot take (EAGAIN) stays pending here (one at most, with the rest
// of its batch of fault messages), and no more faults are read until the outbox drains
// and takes it. It reads fault messages in batches and, per fault:
//   PRESENT    → the page was placed after the fault was queued: UFFDIO_WAKE.
//   STAGED     → its bytes are in the file already (pre-copy): map it, no request.
//   REQUESTED/PLACING → already on its way; the placement's ioctl will wake the thread.
//   MISSING    → REQUESTED, plus up to `window` following MISSING pages, in one request.
// The window doubles while faults walk forward through a region and falls back to one
// page on a random access, so a sequential scan costs few round trips and a random one
// does not wait for pages it will not use.
#include <poll.h>
#include <sys/eventfd.h>

#include <array>

#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::pager {

Result<void> Pager::start(net::Outbox& out, std::function<void(const Error&)> on_error) {
    if (thread_.joinable()) return logic_error("pager: fault thread already running");
    outbox_ = &out;
    const int wfd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wfd < 0) return sys_error("pager: eventfd for the fault thread's link handover", errno);
    wake_fd_ = net::Fd(wfd);
    fault_thread_done_ = false;
    on_error_ = std::move(on_error);
    try {
        thread_ = std::thread([this] { fault_thread(); });
    } catch (const std::system_error& e) {
        return sys_error("pager: starting the fault thread", e.code().value());
    }
    return {};
}

void Pager::stop() {
    if (!thread_.joinable()) return;
    stop_event_.signal();
    thread_.join();
}

void Pager::fault_thread() {
    auto done = [&] {
        std::lock_guard lock(link_mu_);
        fault_thread_done_ = true;
        link_cv_.notify_all();
    };
    auto fail = [&](const Error& e) {
        LZ_LOG(error, "pager_fault_thread_failed", "{}", e.message());
        done();
        if (on_error_) on_error_(e);
    };
    // A send on the link failed: the link is down, the thread goes on without it (the
    // session decides whether that pauses or ends the migration).
    auto link_failed = [&](const Error& e) {
        LZ_LOG(warn, "pager_link_failed", "{}", e.message());
        outbox_ = nullptr;
        pending_.reset();
        if (on_error_) on_error_(e);
    };
    for (;;) {
        {
            std::lock_guard lock(link_mu_);
            if (link_seen_ != link_gen_) {  // detach_outbox / attach_outbox
                outbox_ = next_outbox_;
                pending_.reset();  // its pages stay REQUESTED: asked again after an attach
                link_seen_ = link_gen_;
                link_cv_.notify_all();
            }
        }
        // Faults wait in the uffd (bounded by the guest's threads) while a request is
        // blocked on a full outbox: only the blocked request and the rest of its batch
        // are held here.
        const bool blocked = pending_.has_value();
        const bool want_out = outbox_ && (blocked || outbox_->pending());
        pollfd fds[4] = {{stop_event_.fd(), POLLIN, 0},
                         {blocked ? -1 : uffd_.fd(), POLLIN, 0},
                         {want_out ? outbox_->poll_fd() : -1, POLLOUT, 0},
                         {wake_fd_.get(), POLLIN, 0}};
        const int n = ::poll(fds, 4, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            const int e = errno;
            return fail(Error{e, "pager: poll on the userfaultfd, the stop eventfd and the urgent channel"});
        }
        if (fds[0].revents) return done();
        if (fds[3].revents) {
            std::uint64_t v;
            [[maybe_unused]] auto got = ::read(wake_fd_.get(), &v, sizeof v);
            continue;  // the handover is taken at the top of the loop
        }
        if (fds[2].revents) {
            auto drained = outbox_->flush();
            if (!drained) {
                link_failed(drained.error().wrap("pager: sending page requests"));
                continue;
            }
            if (!*drained && (fds[2].revents & (POLLERR | POLLHUP | POLLNVAL))) {
                link_failed(Error{0, fmt::format("{}: poll reports events {:#x} while page requests wait to be sent",
                                                 outbox_->where(), fds[2].revents),
                                  ErrorClass::transport_lost});
                continue;
            }
            if (blocked) {
                auto r = post_request();
                if (!r) {
                    if (r.error().kind != ErrorClass::transport_lost) return fail(r.error());
                    link_failed(r.error());
                    continue;
                }
                if (pending_) continue;  // still no room
            }
        }
        if (fds[1].revents & (POLLERR | POLLHUP | POLLNVAL))
            return fail(Error{0, fmt::format("pager: userfaultfd reported poll events {:#x}", fds[1].revents)});
        if (!pending_ && batch_pos_ == batch_len_ && (fds[1].revents & POLLIN)) {
            auto got = read_batch();
            if (!got) return fail(got.error());
            batch_pos_ = 0;
            batch_len_ = *got;
        }
        while (!pending_ && batch_pos_ < batch_len_) {
            if (auto r = handle_fault(batch_[batch_pos_++]); !r) {
                if (r.error().kind != ErrorClass::transport_lost) return fail(r.error());
                link_failed(r.error());
            }
        }
    }
}

// Posts the pending request; it stays pending when the outbox has no room (EAGAIN).
Result<void> Pager::post_request() {
    auto r = outbox_->post(*pending_);
    if (r) {
        pending_.reset();
        return {};
    }
    if (r.error().code == EAGAIN) {
        if (int e = failpoint::check("pager_request_blocked", 0, 0, 0))
            return sys_error("pager: failpoint pager_request_blocked", e);
        return {};
    }
    // Whatever the channel reports, a send that failed means the link is down.
    auto e = r.error().wrap("pager: sending a page request");
    if (e.kind == ErrorClass::local) e.kind = ErrorClass::transport_lost;
    return std::unexpected(std::move(e));
}

Result<void> Pager::handle_fault(const uffd::Event& ev) {
    if (ev.kind == uffd::Event::Kind::remove) return {};  // applied when read (read_batch)
    if (ev.kind != uffd::Event::Kind::pagefault) {
        if (ev.kind == uffd::Event::Kind::fork && ev.fork_fd >= 0) ::close(ev.fork_fd);
        LZ_LOG(debug, "pager_event_ignored", "kind={}", static_cast<int>(ev.kind));
        return {};
    }
    // Find the region; the uffd only reports addresses inside registered ranges.
    std::uint32_t ri = 0;
    for (; ri < regions_.size(); ++ri) {
        const auto base = reinterpret_cast<std::uint64_t>(regions_[ri].guest.host);
        if (ev.address >= base && ev.address < base + regions_[ri].guest.size) break;
    }
    if (ri == regions_.size())
        return logic_error(fmt::format("pager: fault at {:#x} outside every guest region", ev.address));
    Region& r = regions_[ri];
    const std::uint64_t page = (ev.address - reinterpret_cast<std::uint64_t>(r.guest.host)) / r.guest.page_size;
    stats_.faults.add();
    const std::uint32_t now = now_us();
    // The thread waits from now until its page is present. Published before the state is
    // read, so that a placement racing with this fault either sees the wait or is seen
    // (blocktime.cpp); THREAD_ID missing: slot -1, nothing attributed.
    const int slot = blocktime_->begin(ev.tid, ri, page, now);
    std::atomic_thread_fence(std::memory_order_seq_cst);

    switch (r.state.get(page)) {
    case PageState::present:
        blocktime_->recheck(slot, ri, page, true, now);
        return uffd_.wake(r.host(page), r.guest.page_size);
    case PageState::staged: {
        // The bytes are here (pre-copy): map them and their staged neighbours, no network.
        r.fault_at[page].store(now, std::memory_order_relaxed);
        auto n = map_staged(ri, page, std::min<std::uint64_t>(prefetch_max_.load(std::memory_order_relaxed), r.pages - page));
        if (!n) return std::unexpected(n.error());
        if (*n == 0) blocktime_->recheck(slot, ri, page, r.state.get(page) == PageState::present, now);
        return {};
    }
    case PageState::requested:
    case PageState::placing: {
        std::uint32_t none = 0;  // first fault on a prefetched page starts its clock
        r.fault_at[page].compare_exchange_strong(none, now, std::memory_order_relaxed);
        if (int e = failpoint::check("pager_fault_in_flight", ri, page, 1))
            return sys_error("pager: failpoint pager_fault_in_flight", e);
        return {};
    }
    case PageState::missing:
        break;
    }
    if (!r.state.mark_requested(page)) {
        // A push claimed it meanwhile (its placement ends the wait), or it was placed
        // already: the thread may have been woken before its wait was published.
        if (r.state.get(page) == PageState::present) {
            blocktime_->recheck(slot, ri, page, true, now);
            return uffd_.wake(r.host(page), r.guest.page_size);
        }
        return {};
    }
    r.fault_at[page].store(now, std::memory_order_relaxed);

    // Prefetch trend: forward within twice the window doubles it; anything else resets.
    if (r.last_fault != ~0ull && page > r.last_fault && page - r.last_fault <= 2ull * r.window)
        r.window = std::min(r.window * 2, prefetch_max_.load(std::memory_order_relaxed));
    else
        r.window = 1;
    r.last_fault = page;

    std::uint32_t count = 1;
    r.window = std::min(r.window, prefetch_max_.load(std::memory_order_relaxed));
    while (count < r.window && page + count < r.pages && r.state.mark_requested(page + count)) ++count;
    stats_.requests.add();
    LZ_LOG(debug, "pager_request", "region={} page={} count={}", ri, page, count);
    if (sink_) return sink_->request(ri, page, count);
    if (!outbox_) return {};  // link down: the pages stay REQUESTED and are asked for after recover
    pending_ = proto::encode(proto::PageRequest{.region = ri, .count = count, .first = page});
    return post_request();
}

}  // namespace lazymig::pager
