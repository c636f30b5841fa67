// The background pusher: one sender per bulk channel, each over its own address share.
//
// Order within a share: before each batch the newest fault hint routed to this sender
// is taken; the pages after it (one batch forward, then one backward) go out first, as
// Hines & Gopalan's "bubbling" post-copy does, because a guest that faulted there will
// likely touch its neighbours next. Then the sweep resumes where it stopped.
//
// Why split by address (QEMU multifd hands whole pages batches to whichever channel is
// free; here each sender owns a share): no shared cursor to contend on, a sender's
// frames are contiguous runs, and a hint has exactly one owner.
#include <sys/resource.h>
#include <unistd.h>

#include <fmt/format.h>

#include "precopy/source.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::source {

struct Pusher::Lane {
    std::size_t index = 0, count = 1;
    net::Channel* channel = nullptr;
    std::array<std::unique_ptr<PageFramer>, 2> framers;
    std::size_t next = 0;              // the framer the next batch is built in
    bool in_flight = false;            // framers[next ^ 1]'s frame is on the wire
    std::uint64_t flight_pages = 0, flight_zero = 0, flight_bytes = 0;
    std::chrono::steady_clock::time_point next_send{};
    std::thread thread;
};

Pusher::Pusher(std::span<const GuestRegion> regions, PageReader& reader, SentMap& sent, SourceStats& stats,
               PushConfig config)
    : regions_(regions), reader_(reader), sent_(sent), stats_(stats), config_(config) {}

Pusher::~Pusher() {
    stop();
    join();
}

void Pusher::stop() {
    stop_.store(true, std::memory_order_release);
    if (config_.gate) config_.gate->shutdown();
}

void Pusher::join() {
    for (auto& l : lanes_)
        if (l->thread.joinable()) l->thread.join();
}

std::size_t Pusher::owner(std::uint32_t region, std::uint64_t page, std::size_t lanes) const {
    const std::uint64_t pages = regions_[region].size / regions_[region].page_size;
    std::size_t i = static_cast<std::size_t>((static_cast<unsigned __int128>(page) * lanes) / pages);
    while (i + 1 < lanes && share_start(pages, i + 1, lanes) <= page) ++i;
    while (i > 0 && share_start(pages, i, lanes) > page) --i;
    return i;
}

void Pusher::hint(std::uint32_t region, std::uint64_t page) {
    if (region >= regions_.size() || page >= regions_[region].size / regions_[region].page_size) return;
    const std::size_t lanes = live_lanes_.load(std::memory_order_acquire);
    hints_[lanes == 0 ? 0 : owner(region, page, lanes)].push(region, page);
}

void Pusher::report(const Error& e) {
    stop_.store(true, std::memory_order_release);
    if (!reported_.exchange(true)) on_error_(e);
}

Result<void> Pusher::prepare(std::size_t channels) {
    if (!lanes_.empty()) return logic_error("source: the pusher was already prepared");
    if (channels == 0 || channels > kMaxChannels)
        return logic_error(fmt::format("source: {} bulk channels (expected 1 to {})", channels, kMaxChannels));
    for (std::size_t i = 0; i < channels; ++i) {
        auto lane = std::make_unique<Lane>();
        lane->index = i;
        lane->count = channels;
        for (auto& f : lane->framers) {
            auto made = PageFramer::create(regions_, reader_);
            if (!made) return std::unexpected(made.error().wrap(fmt::format("source: bulk sender {}", i)));
            f = std::move(*made);
        }
        lanes_.push_back(std::move(lane));
    }
    return {};
}

Result<void> Pusher::start(std::vector<net::Channel*> bulk, std::function<void(const Error&)> on_error) {
    if (live_lanes_.load(std::memory_order_acquire) != 0) return logic_error("source: the pusher was already started");
    if (lanes_.empty())
        if (auto p = prepare(bulk.size()); !p) return p;
    if (bulk.size() != lanes_.size())
        return logic_error(fmt::format("source: {} bulk channels for a pusher prepared for {}", bulk.size(), lanes_.size()));
    on_error_ = std::move(on_error);
    for (std::size_t i = 0; i < bulk.size(); ++i) lanes_[i]->channel = bulk[i];
    // Hints given before now waited in lane 0's queue: hand them to their owners.
    live_lanes_.store(bulk.size(), std::memory_order_release);
    std::vector<std::pair<std::uint32_t, std::uint64_t>> early;
    std::uint32_t hr;
    std::uint64_t hp;
    while (hints_[0].pop(&hr, &hp)) early.emplace_back(hr, hp);  // newest first
    for (auto it = early.rbegin(); it != early.rend(); ++it) hint(it->first, it->second);

    for (auto& lane : lanes_) {
        try {
            lane->thread = std::thread([this, l = lane.get()] {
                Result<void> r = run(*l);
                // The staging buffer of a frame still on the wire must outlive that send.
                if (l->in_flight) (void)l->channel->send_finish();
                if (!r && r.error().code == ECANCELED) {
                    LZ_LOG(debug, "source_push_stopped", "sender={} {}", l->index, r.error().message());
                } else if (!r) {
                    LZ_LOG(warn, "source_push_failed", "sender={} {}", l->index, r.error().message());
                    report(r.error());
                }
            });
        } catch (const std::system_error& e) {
            stop();
            join();
            return sys_error(fmt::format("source: starting bulk sender thread {} of {}", lane->index, lanes_.size()),
                             e.code().value());
        }
    }
    return {};
}

// Waits for the frame on the wire, then counts it.
Result<void> Pusher::finish(Lane& lane) {
    if (!lane.in_flight) return {};
    if (auto r = lane.channel->send_finish(); !r) return r;
    lane.in_flight = false;
    stats_.pushed_pages.add(lane.flight_pages);
    stats_.zero_pages.add(lane.flight_zero);
    stats_.bytes_sent.add(lane.flight_bytes);
    return {};
}

Result<void> Pusher::submit(Lane& lane, std::uint32_t region, std::uint64_t first, std::uint32_t count) {
    if (stop_.load(std::memory_order_acquire)) return sys_error("bulk sender: stopped", ECANCELED);
    if (DemandGate* g = config_.gate; g && g->in_service() != 0) {
        stats_.push_yields.add();
        if (int e = failpoint::check("source_push_yield", region, first, count))
            return sys_error(fmt::format("{}: failpoint source_push_yield", lane.channel->where()), e);
        if (!g->wait_clear()) return sys_error("bulk sender: stopped while yielding to demand", ECANCELED);
    }
    if (int e = failpoint::check("source_push_batch", region, first, count))
        return sys_error(fmt::format("{}: failpoint source_push_batch", lane.channel->where()), e);
    // Built while the previous frame (in the other framer) is still on the wire.
    auto frame = lane.framers[lane.next]->build(region, first, count);
    if (!frame) return std::unexpected(frame.error().wrap(lane.channel->where()));
    if (auto r = finish(lane); !r) return r;
    // Pacing after the previous send completed: a channel takes no other call while a
    // send is in flight (its ring would hand the timer's completion to the send).
    if (const auto bw = config_.max_bandwidth ? config_.max_bandwidth->load(std::memory_order_relaxed) : 0; bw != 0) {
        // Pacing, not synchronisation: this sender's share of the budget.
        const double per_lane = double(bw) / double(lane.count);
        const auto now = std::chrono::steady_clock::now();
        if (lane.next_send < now) lane.next_send = now;
        if (auto w = lane.channel->wait_until(lane.next_send); !w) return w;
        lane.next_send += std::chrono::nanoseconds(static_cast<std::int64_t>(1e9 * double(frame->bytes) / per_lane));
    }
    if (auto r = lane.channel->send_start(frame->iov); !r) return r;
    lane.in_flight = true;
    lane.flight_pages = count;
    lane.flight_zero = frame->zero_pages;
    lane.flight_bytes = frame->bytes;
    lane.next ^= 1;
    return {};
}

// Sends every unsent page of [from, to), in batches of consecutive unsent pages.
Result<void> Pusher::push_range(Lane& lane, std::uint32_t region, std::uint64_t from, std::uint64_t to) {
    const std::uint32_t limit = std::clamp<std::uint32_t>(
        config_.batch_pages ? config_.batch_pages->load(std::memory_order_relaxed) : 256, 1,
        lane.framers[0]->max_pages(region));
    std::uint64_t p = from;
    while (p < to) {
        if (!sent_.mark(region, p)) {
            ++p;
            continue;
        }
        std::uint32_t count = 1;
        while (count < limit && p + count < to && sent_.mark(region, p + count)) ++count;
        stats_.sent_pages.add(count);
        if (auto r = submit(lane, region, p, count); !r) return r;
        p += count;
    }
    return {};
}

Result<void> Pusher::run(Lane& lane) {
    if (config_.nice != 0 && ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), config_.nice) != 0) {
        const int e = errno;
        LZ_LOG(warn, "source_push_nice", "sender={} setpriority +{}: {}", lane.index, config_.nice, std::strerror(e));
    }
    LZ_LOG(info, "source_push_start", "sender={} of {} regions={}", lane.index, lane.count, regions_.size());
    HintQueue& hints = hints_[lane.index];
    for (std::uint32_t region = 0; region < regions_.size(); ++region) {
        const std::uint64_t pages = regions_[region].size / regions_[region].page_size;
        std::uint64_t cursor = share_start(pages, lane.index, lane.count);
        const std::uint64_t end = share_start(pages, lane.index + 1, lane.count);
        while (cursor < end) {
            std::uint32_t hr;
            std::uint64_t hp;
            if (hints.pop(&hr, &hp)) {
                const std::uint64_t hpages = regions_[hr].size / regions_[hr].page_size;
                const std::uint64_t span = config_.batch_pages ? config_.batch_pages->load(std::memory_order_relaxed) : 256;
                if (auto r = push_range(lane, hr, hp, std::min(hpages, hp + span)); !r) return r;
                if (auto r = push_range(lane, hr, hp > span ? hp - span : 0, hp); !r) return r;
                continue;
            }
            // One batch at a time, so a hint waits for at most one batch of the sweep.
            const std::uint64_t batch = std::max<std::uint32_t>(
                1, config_.batch_pages ? config_.batch_pages->load(std::memory_order_relaxed) : 256);
            const std::uint64_t step = std::min<std::uint64_t>(end, cursor + batch);
            if (auto r = push_range(lane, region, cursor, step); !r) return r;
            cursor = step;
        }
    }
    if (auto r = finish(lane); !r) return r;
    auto done = proto::encode_empty(proto::Type::push_done);
    const iovec iov{done.data(), done.size()};
    if (auto s = lane.channel->send(std::span(&iov, 1)); !s) return std::unexpected(s.error().wrap("PUSH_DONE"));
    LZ_LOG(info, "source_push_done", "sender={} pushed={} zero={}", lane.index, stats_.pushed_pages.get(),
           stats_.zero_pages.get());
    return {};
}

}  // namespace lazymig::source
