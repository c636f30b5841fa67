// Pre-copy rounds and the switchover decision; see precopy.hpp.
#include "precopy/precopy.hpp"

#include <lz4.h>

#include <cstring>

#include <fmt/format.h>

#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::source {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string_view method_name(DirtyTracking t) {
    switch (t) {
    case DirtyTracking::wp_async: return "wp-async";
    case DirtyTracking::wp_sync: return "wp-sync";
    case DirtyTracking::vmm: return "vmm";
    default: return "invalid";
    }
}

}  // namespace

Verdict decide(Mode mode, const Parameters& p, const std::vector<Stats::Round>& history, std::uint64_t remaining_bytes,
               double elapsed_ms, std::uint64_t bytes_sent) {
    if (history.empty()) return {Decision::next_round, "no round yet"};
    const auto& last = history.back();
    // The bandwidth of the last round that moved enough to be measured; a short round of
    // a few pages says more about syscall latency than about the link.
    // Guest RAM moved per second, not wire bytes: zero pages and lz4 make the wire carry
    // less than the pages it moves, and the dirty set left is counted in pages.
    double bw = 0;
    for (auto it = history.rbegin(); it != history.rend() && bw == 0; ++it)
        if (it->bytes_sent >= (1u << 20) || it == history.rend() - 1) bw = it->ram_rate > 0 ? it->ram_rate : it->bandwidth;
    const double expected_ms = bw > 0 ? 1000.0 * double(remaining_bytes) / bw : 0;
    if (remaining_bytes == 0 || (bw > 0 && expected_ms <= p.downtime_limit_ms))
        return {Decision::converged,
                fmt::format("converged after round {}: {} dirty pages' {} bytes take {:.1f} ms at {:.1f} MB/s, within "
                            "the {:.0f} ms downtime limit",
                            last.round, last.dirty_pages, remaining_bytes, expected_ms, bw / 1e6, p.downtime_limit_ms)};
    const auto left = fmt::format("{} bytes still dirty would take {:.1f} ms at {:.1f} MB/s (limit {:.0f} ms)",
                                  remaining_bytes, expected_ms, bw / 1e6, p.downtime_limit_ms);
    if (p.max_rounds != 0 && last.round >= p.max_rounds)
        return {Decision::bound, fmt::format("bound: {} rounds (max_rounds); {}", last.round, left)};
    if (p.max_precopy_bytes != 0 && bytes_sent >= p.max_precopy_bytes)
        return {Decision::bound,
                fmt::format("bound: {} bytes sent (max_precopy_bytes {}); {}", bytes_sent, p.max_precopy_bytes, left)};
    if (p.max_precopy_ms != 0 && elapsed_ms >= p.max_precopy_ms)
        return {Decision::bound, fmt::format("bound: {:.0f} ms of pre-copy (max_precopy_ms {}); {}", elapsed_ms,
                                             p.max_precopy_ms, left)};
    if (mode == Mode::hybrid && history.size() >= 3) {
        // The first pass sends all of RAM and says nothing about the trend: rounds 2+.
        const auto& a = history[history.size() - 2];
        const std::size_t ps_bytes = last.dirty_pages ? remaining_bytes / last.dirty_pages : 4096;
        auto rate = [](const Stats::Round& r) { return r.ram_rate > 0 ? r.ram_rate : r.bandwidth; };
        auto outpaced = [&](const Stats::Round& r) { return r.dirty_rate * double(ps_bytes) >= rate(r); };
        if (outpaced(a) && outpaced(last))
            return {Decision::diverging,
                    fmt::format("diverging: the guest dirties {:.1f} MB/s, the link moves {:.1f} MB/s (rounds {}-{}); {}",
                                last.dirty_rate * double(ps_bytes) / 1e6, rate(last) / 1e6, a.round, last.round,
                                left)};
        if (history.size() >= 4) {
            const auto& b = history[history.size() - 3];
            if (last.dirty_pages >= a.dirty_pages && a.dirty_pages >= b.dirty_pages)
                return {Decision::diverging,
                        fmt::format("diverging: the dirty set did not shrink over rounds {}-{} ({}, {}, {} pages); {}",
                                    b.round, last.round, b.dirty_pages, a.dirty_pages, last.dirty_pages, left)};
        }
    }
    return {Decision::next_round, left};
}

Result<Packer> Packer::create(std::size_t largest_page) {
    // The largest frame: header + meta, then (u32 + a page) per page.
    const std::size_t bytes = proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8 +
                              std::size_t(proto::kMaxPagesPerFrame) * (4 + largest_page);
    auto b = StagingBuffer::create(std::min(bytes, proto::kMaxPagesPayload + proto::kHeaderSize));
    if (!b) return std::unexpected(b.error().wrap("pre-copy: the lz4 buffer"));
    Packer p;
    p.buf_ = std::move(*b);
    return p;
}

bool Packer::wanted(Compression mode, double link) {
    if (mode == Compression::off) return false;
    if (mode == Compression::on) return true;
    if (ratio_ == 0 || ++since_probe_ >= kProbeEvery) {
        since_probe_ = 0;
        return true;
    }
    if (ratio_ < 1.5) return false;
    return link <= 0 || pack_rate_ > link * ratio_ / (ratio_ - 1);
}

BuiltFrame Packer::pack(const BuiltFrame& frame, const PageFramer& framer, std::size_t ps) {
    const auto t0 = Clock::now();
    const iovec& head = frame.iov[0];
    std::byte* out = buf_.data();
    std::memcpy(out, head.iov_base, head.iov_len);
    std::size_t at = head.iov_len, raw = 0;
    for (std::size_t k = 1; k < frame.iov.size(); ++k) {
        const auto* src = static_cast<const char*>(frame.iov[k].iov_base);
        for (std::size_t off = 0; off < frame.iov[k].iov_len; off += ps) {
            // A bound of ps - 1: a block that does not shrink is not worth a decompression.
            const int n = LZ4_compress_default(src + off, reinterpret_cast<char*>(out + at + 4), static_cast<int>(ps),
                                               static_cast<int>(ps - 1));
            const auto stored = static_cast<std::uint32_t>(n > 0 ? n : static_cast<int>(ps));
            if (n <= 0) std::memcpy(out + at + 4, src + off, ps);
            std::memcpy(out + at, &stored, 4);  // little-endian, as the rest of the wire
            at += 4 + stored;
            raw += ps;
        }
    }
    auto hdr = std::span<std::byte, proto::kHeaderSize>(out, proto::kHeaderSize);
    proto::write_header(hdr, proto::Type::precopy_lz4, static_cast<std::uint32_t>(at - proto::kHeaderSize));
    const auto meta = std::span<const std::byte>(out + proto::kHeaderSize, head.iov_len - proto::kHeaderSize);
    proto::set_checksum(hdr, proto::pages_checksum(hdr, meta, framer.page_crcs()));
    const double secs = std::max(1e-7, std::chrono::duration<double>(Clock::now() - t0).count());
    const double r = raw ? double(raw) / double(at - head.iov_len) : 1;
    // Running figures over the last few frames: a guest's pages change character slowly.
    ratio_ = ratio_ == 0 ? r : 0.75 * ratio_ + 0.25 * r;
    pack_rate_ = pack_rate_ == 0 ? double(raw) / secs : 0.75 * pack_rate_ + 0.25 * double(raw) / secs;
    iov_ = iovec{out, at};
    return BuiltFrame{std::span<const iovec>(&iov_, 1), frame.zero_pages, at};
}

Precopy::Precopy(std::span<const GuestRegion> regions, PageReader& reader, SentMap& sent, SourceStats& stats,
                 PrecopyConfig config)
    : regions_(regions), reader_(reader), sent_(sent), stats_(stats), config_(std::move(config)), dirty_(regions) {}

Result<void> Precopy::start(std::unique_ptr<DirtyTracker> tracker, std::vector<net::Channel*> bulk) {
    if (bulk.empty()) return logic_error("pre-copy: no bulk channel");
    auto framer = PageFramer::create(regions_, reader_);
    if (!framer) return std::unexpected(framer.error().wrap("pre-copy"));
    framer_ = std::move(*framer);
    std::size_t largest = 4096;
    for (const auto& r : regions_) largest = std::max(largest, r.page_size);
    auto packer = Packer::create(largest);
    if (!packer) return std::unexpected(packer.error());
    packer_.emplace(std::move(*packer));
    bulk_ = std::move(bulk);
    tracker_ = std::move(tracker);
    {
        std::lock_guard lock(mu_);
        method_ = method_name(tracker_->method());
    }
    // Armed before the first page is read: a write after its read is then always seen.
    if (auto s = tracker_->start(); !s) return std::unexpected(s.error().wrap("pre-copy"));
    began_ = Clock::now();
    LZ_LOG(info, "precopy_start", "tracking={} channels={}", method_name(tracker_->method()), bulk_.size());
    return {};
}

std::string Precopy::method() const {
    std::lock_guard lock(mu_);
    return method_;
}

void Precopy::stop_tracking() noexcept {
    if (tracker_) tracker_->stop();
}

std::vector<Stats::Round> Precopy::rounds() const {
    std::lock_guard lock(mu_);
    return rounds_;
}

Result<void> Precopy::send_run(std::uint32_t region, std::uint64_t first, std::uint64_t count, Stats::Round& round) {
    const std::uint64_t pages = regions_[region].size / regions_[region].page_size;
    const std::uint32_t max = framer_->max_pages(region);
    const std::size_t n = bulk_.size();
    while (count > 0) {
        // The channel whose share holds `first`; a frame never crosses into the next share.
        std::size_t lane = static_cast<std::size_t>((static_cast<unsigned __int128>(first) * n) / pages);
        while (lane + 1 < n && share_start(pages, lane + 1, n) <= first) ++lane;
        while (lane > 0 && share_start(pages, lane, n) > first) --lane;
        const std::uint64_t share_end = share_start(pages, lane + 1, n);
        const auto take = static_cast<std::uint32_t>(std::min<std::uint64_t>({count, max, share_end - first}));
        if (int e = failpoint::check("source_precopy_batch", region, first, take))
            return sys_error("pre-copy: failpoint source_precopy_batch", e);
        auto frame = framer_->build(region, first, take, proto::Type::precopy_pages);
        if (!frame) return std::unexpected(frame.error().wrap("pre-copy"));
        const std::uint64_t nonzero = take - frame->zero_pages;
        if (nonzero != 0 && packer_->wanted(config_.parameters().compression, link_rate_)) {
            const std::size_t raw = frame->bytes;
            frame = packer_->pack(*frame, *framer_, regions_[region].page_size);
            packed_pages_.fetch_add(nonzero);
            packed_raw_.fetch_add(raw);
            packed_wire_.fetch_add(frame->bytes);
            round.compressed_pages += nonzero;
            round.compression_ratio += double(raw);    // summed here, divided at the round's end
            round_packed_wire_ += frame->bytes;
        }
        if (const auto bw = config_.max_bandwidth ? config_.max_bandwidth->load(std::memory_order_relaxed) : 0; bw != 0) {
            // Pacing, not synchronisation: the whole budget, one frame after another.
            const auto now = Clock::now();
            if (next_send_ < now) next_send_ = now;
            if (auto w = bulk_[lane]->wait_until(next_send_); !w) return w;
            next_send_ += std::chrono::nanoseconds(static_cast<std::int64_t>(1e9 * double(frame->bytes) / double(bw)));
        }
        const auto sent_at = Clock::now();
        if (auto s = bulk_[lane]->send(frame->iov); !s) return s;
        const double secs = std::max(1e-7, std::chrono::duration<double>(Clock::now() - sent_at).count());
        link_rate_ = link_rate_ == 0 ? double(frame->bytes) / secs : 0.75 * link_rate_ + 0.25 * double(frame->bytes) / secs;
        std::uint64_t again = 0;
        for (std::uint32_t i = 0; i < take; ++i) again += !sent_.mark(region, first + i);
        resent_.fetch_add(again);
        stats_.sent_pages.add(take - again);
        stats_.zero_pages.add(frame->zero_pages);
        stats_.bytes_sent.add(frame->bytes);
        round.pages_sent += take;
        round_ram_bytes_ += std::uint64_t(take) * regions_[region].page_size;
        round.zero_pages += frame->zero_pages;
        round.bytes_sent += frame->bytes;
        first += take;
        count -= take;
    }
    return {};
}

Result<void> Precopy::send_set(const DirtySet& pages, Stats::Round& round) {
    Result<void> result;
    for (std::uint32_t ri = 0; ri < regions_.size() && result; ++ri)
        pages.for_each_run(ri, [&](std::uint64_t first, std::uint64_t count) {
            if (result) result = send_run(ri, first, count, round);
        });
    return result;
}

// ROUND_END on every bulk channel, then the destination's ROUND_ACK: round `n` placed.
Result<void> Precopy::end_round(std::uint32_t n, net::FrameReader& urgent) {
    const auto end = proto::encode(proto::Type::round_end, proto::RoundMark{n});
    for (auto* ch : bulk_)
        if (auto s = net::send_frame(*ch, end); !s) return std::unexpected(s.error().wrap("ROUND_END"));
    auto ack = urgent.expect(proto::Type::round_ack);
    if (!ack) return std::unexpected(ack.error());
    auto mark = proto::decode_round(proto::Type::round_ack, *ack);
    if (!mark) return std::unexpected(mark.error().wrap(urgent.where()));
    if (mark->round != n)
        return peer_violation(fmt::format("{}: ROUND_ACK for round {} while round {} ends", urgent.where(), mark->round, n));
    return {};
}

Result<Verdict> Precopy::run_rounds(const std::atomic<bool>& stop, net::FrameReader& urgent) {
    // Round 1: all of RAM.
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) dirty_.set_range(ri, 0, regions_[ri].size / regions_[ri].page_size);
    for (std::uint32_t n = 1;; ++n) {
        if (stop.load()) return sys_error("pre-copy: stopped", ECANCELED);
        if (int e = failpoint::check("source_precopy_round", 0, n, 0)) return sys_error("pre-copy: failpoint source_precopy_round", e);
        Stats::Round round;
        round.round = n;
        const auto t0 = Clock::now();
        DirtySet now = std::move(dirty_);
        dirty_ = DirtySet(regions_);
        round_packed_wire_ = 0;
        round_ram_bytes_ = 0;
        if (auto s = send_set(now, round); !s) return std::unexpected(s.error());
        if (auto e = end_round(n, urgent); !e) return std::unexpected(e.error());
        round.compression_ratio = round_packed_wire_ ? round.compression_ratio / double(round_packed_wire_) : 0;
        if (auto c = tracker_->collect(dirty_); !c) return std::unexpected(c.error().wrap("pre-copy"));
        const auto t1 = Clock::now();
        round.ms = ms_between(t0, t1);
        round.dirty_pages = dirty_.count();
        const double secs = std::max(round.ms, 1e-3) / 1000;
        round.bandwidth = double(round.bytes_sent) / secs;
        round.ram_rate = double(round_ram_bytes_) / secs;
        round.dirty_rate = double(round.dirty_pages) / secs;
        bytes_total_ += round.bytes_sent;
        std::vector<Stats::Round> history;
        {
            std::lock_guard lock(mu_);
            rounds_.push_back(round);
            history = rounds_;
        }
        std::uint64_t remaining = 0;
        for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
            std::uint64_t c = 0;
            for (auto w : dirty_.words(ri)) c += static_cast<std::uint64_t>(std::popcount(w));
            remaining += c * regions_[ri].page_size;
        }
        auto v = decide(config_.mode, config_.parameters(), history, remaining, ms_between(began_, t1), bytes_total_);
        LZ_LOG(info, "precopy_round", "round={} sent={} zero={} bytes={} ms={:.1f} MB/s={:.1f} dirty={} decision={}", n,
               round.pages_sent, round.zero_pages, round.bytes_sent, round.ms, round.bandwidth / 1e6, round.dirty_pages,
               v.why);
        if (v.decision != Decision::next_round) return v;
    }
}

Result<void> Precopy::switchover(net::Channel& urgent) {
    auto c = tracker_->collect(dirty_);
    tracker_->stop();
    if (!c) return std::unexpected(c.error().wrap("pre-copy: the final dirty scan"));
    if (config_.mode == Mode::precopy) {
        // Stop-and-copy: the last dirty pages go now, inside the downtime.
        Stats::Round last;
        last.round = static_cast<std::uint32_t>(rounds().size() + 1);
        last.dirty_pages = 0;
        const auto t0 = Clock::now();
        round_packed_wire_ = 0;
        if (auto s = send_set(dirty_, last); !s) return s;
        last.compression_ratio = round_packed_wire_ ? last.compression_ratio / double(round_packed_wire_) : 0;
        last.ms = ms_between(t0, Clock::now());
        last.bandwidth = double(last.bytes_sent) / (std::max(last.ms, 1e-3) / 1000);
        std::lock_guard lock(mu_);
        rounds_.push_back(last);
    } else {
        // Hybrid: the destination forgets these pages; post-copy fetches them again.
        proto::StaleSet set;
        auto flush = [&]() -> Result<void> {
            if (set.runs.empty()) return {};
            auto f = proto::encode(set);
            set.runs.clear();
            return net::send_frame(urgent, f);
        };
        Result<void> result;
        for (std::uint32_t ri = 0; ri < regions_.size() && result; ++ri)
            dirty_.for_each_run(ri, [&](std::uint64_t first, std::uint64_t count) {
                for (std::uint64_t p = first; p < first + count; ++p) sent_.unmark(ri, p);
                stale_.fetch_add(count);
                while (count > 0 && result) {
                    const auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(count, UINT32_MAX));
                    set.runs.push_back({ri, n, first});
                    first += n;
                    count -= n;
                    if (set.runs.size() == proto::kMaxStaleRuns) result = flush();
                }
            });
        if (result) result = flush();
        if (!result) return std::unexpected(result.error().wrap("pre-copy: sending STALE"));
    }
    auto end = proto::encode_empty(proto::Type::precopy_end);
    for (auto* ch : bulk_)
        if (auto s = net::send_frame(*ch, end); !s) return std::unexpected(s.error().wrap("PRECOPY_END"));
    LZ_LOG(info, "precopy_switchover", "mode={} final_dirty={} resent={} stale={}",
           config_.mode == Mode::precopy ? "precopy" : "hybrid", dirty_.count(), resent_.load(), stale_.load());
    return {};
}

}  // namespace lazymig::source
