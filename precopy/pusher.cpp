// The background pusher: every page not yet sent, the faults' neighbourhood first.
//
// Order: before each batch the newest fault hint is taken; the pages after it (one
// batch forward, then one backward) go out first, as Hines & Gopalan's "bubbling"
// post-copy does, because a guest that faulted there will likely touch its
// neighbours next. Then the sweep through the regions resumes where it stopped.
#include <fmt/format.h>

#include "precopy/source.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::source {

Result<void> Pusher::start(std::vector<net::Channel*> bulk, std::function<void(const Error&)> on_error) {
    bulk_ = std::move(bulk);
    try {
        thread_ = std::thread([this, on_error = std::move(on_error)] {
            Result<void> r = run();
            if (!r && r.error().code == ECANCELED) {
                LZ_LOG(debug, "source_push_stopped", "{}", r.error().message());
            } else if (!r) {
                LZ_LOG(warn, "source_push_failed", "{}", r.error().message());
                on_error(r.error());
            }
        });
    } catch (const std::system_error& e) {
        return sys_error("source: starting the pusher thread", e.code().value());
    }
    return {};
}

void Pusher::join() {
    if (thread_.joinable()) thread_.join();
}

Result<void> Pusher::send_batch(std::uint32_t region, std::uint64_t first, std::uint32_t count) {
    if (int e = failpoint::check("source_push_batch", region, first, count))
        return sys_error("bulk channel: failpoint source_push_batch", e);
    std::uint64_t zeros = 0;
    std::size_t bytes = 0;
    auto iov = framer_.build(region, first, count, &zeros, &bytes);
    if (const auto bw = config_.max_bandwidth->load(std::memory_order_relaxed); bw != 0) {
        // Pacing, not synchronisation: the batch may leave when the budget allows.
        const auto now = std::chrono::steady_clock::now();
        if (next_send_ < now) next_send_ = now;
        if (auto w = bulk_[0]->wait_until(next_send_); !w) return w;
        next_send_ += std::chrono::nanoseconds(static_cast<std::int64_t>(1e9 * double(bytes) / double(bw)));
    }
    if (auto s = bulk_[0]->send(iov); !s) return s;
    stats_.pushed_pages.add(count);
    stats_.zero_pages.add(zeros);
    stats_.bytes_sent.add(bytes);
    return {};
}

// Sends every unsent page of [from, to), in batches of consecutive unsent pages.
Result<void> Pusher::push_range(std::uint32_t region, std::uint64_t from, std::uint64_t to) {
    const std::uint32_t limit = std::clamp<std::uint32_t>(config_.batch_pages->load(std::memory_order_relaxed), 1,
                                                          proto::kMaxPagesPerFrame);
    const std::size_t ps = regions_[region].page_size;
    const std::uint32_t max_pages =
        std::min<std::uint32_t>(limit, static_cast<std::uint32_t>(std::max<std::size_t>(1, proto::kMaxPagesPayload / 2 / ps)));
    std::uint64_t p = from;
    while (p < to) {
        if (!sent_.mark(region, p)) {
            ++p;
            continue;
        }
        std::uint32_t count = 1;
        while (count < max_pages && p + count < to && sent_.mark(region, p + count)) ++count;
        stats_.sent_pages.add(count);
        if (auto r = send_batch(region, p, count); !r) return r;
        p += count;
    }
    return {};
}

Result<void> Pusher::run() {
    LZ_LOG(info, "source_push_start", "regions={}", regions_.size());
    for (std::uint32_t region = 0; region < regions_.size(); ++region) {
        const std::uint64_t pages = regions_[region].size / regions_[region].page_size;
        std::uint64_t cursor = 0;
        while (cursor < pages) {
            std::uint32_t hr;
            std::uint64_t hp;
            if (hints_.pop(&hr, &hp)) {
                const std::uint64_t hpages = regions_[hr].size / regions_[hr].page_size;
                const std::uint64_t span = config_.batch_pages->load(std::memory_order_relaxed);
                if (auto r = push_range(hr, hp, std::min(hpages, hp + span)); !r) return r;
                if (auto r = push_range(hr, hp > span ? hp - span : 0, hp); !r) return r;
                continue;
            }
            const std::uint64_t end = std::min<std::uint64_t>(pages, cursor + proto::kMaxPagesPerFrame);
            if (auto r = push_range(region, cursor, end); !r) return r;
            cursor = end;
        }
    }
    auto done = proto::encode_empty(proto::Type::push_done);
    for (auto* c : bulk_)
        if (auto s = net::send_frame(*c, done); !s) return s;
    LZ_LOG(info, "source_push_done", "pushed={} zero={}", stats_.pushed_pages.get(), stats_.zero_pages.get());
    return {};
}

}  // namespace lazymig::source
