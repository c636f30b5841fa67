// Back-replication epochs on the destination; the contract is in replicator.hpp.
#include "pager/replicator.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <bit>
#include <cstring>

#include <fmt/format.h>

#include "src/crc32c.hpp"
#include "src/errors.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"
#include "src/net/frames.hpp"
#include "src/protocol.hpp"

namespace lazymig::pager {
namespace {

constexpr std::size_t kIovMax = 1024;  // IOV_MAX: runs per process_vm_readv
// Staging passes while the vCPUs run, and the copy size below which the next one is left
// to the pause: the vCPUs re-dirty pages while a pass copies (~0.25 ms per 1000 pages
// unloaded, several times that with the vCPUs and other work on two cores), and every
// pass write-protects what it reports, a fault for the next write to each page.
constexpr int kRunningPasses = 3;
constexpr std::uint64_t kPausedPages = 512;
// How long a page reported written may stay PLACING: one placement ioctl, a few µs; a
// page stuck for this long means a placement thread died inside it.
constexpr std::chrono::milliseconds kPlacingLimit{1000};

double ms(std::chrono::steady_clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
std::uint64_t ns(std::chrono::steady_clock::duration d) {
    return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

}  // namespace

Result<std::unique_ptr<Replicator>> Replicator::create(Pager& pager, const VmmHooks& hooks, ReplicatorConfig config) {
    std::unique_ptr<Replicator> r(new Replicator(pager, hooks, config));
    auto scan = PagemapScan::open();
    if (!scan) return std::unexpected(scan.error().wrap("destination replication"));
    r->scan_ = std::move(*scan);
    std::size_t largest = 4096;
    for (const auto& g : pager.regions()) {
        largest = std::max(largest, g.guest.page_size);
        for (auto* b : {&r->epoch_, &r->fresh_, &r->unstaged_}) b->emplace_back((g.pages + 63) / 64, 0);
    }
    // At least one frame's worth, so that every epoch makes progress.
    const std::size_t bytes = std::max(config.staging_bytes, largest * proto::kMaxPagesPerFrame) / largest * largest;
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) return LZ_SYS_ERROR("destination replication: mmap a {} byte staging area", bytes);
    r->staging_ = static_cast<std::byte*>(p);
    r->staging_size_ = bytes;
    r->pieces_.reserve(bytes / 4096);
    r->local_iov_.resize(kIovMax);
    r->remote_iov_.resize(kIovMax);
    r->crcs_.resize(proto::kMaxPagesPerFrame);
    r->ptrs_.resize(proto::kMaxPagesPerFrame);
    LZ_LOG(info, "replicator_create", "epoch_ms={} staging_bytes={} lease_ms={}", config.epoch.count(), bytes,
           config.lease.count());
    return r;
}

Replicator::~Replicator() {
    stop();
    if (staging_) ::munmap(staging_, staging_size_);
}

Result<void> Replicator::start(net::Channel& channel, Clock::time_point lease_anchor,
                               std::function<void(const Error&)> on_error) {
    if (!pager_.tracking_writes()) return logic_error("destination replication: the pager does not track writes");
    channel_ = &channel;
    on_error_ = std::move(on_error);
    {
        std::lock_guard lock(mu_);
        lease_end_ = lease_anchor + cfg_.lease;
    }
    try {
        lease_thread_ = std::thread([this] { lease_loop(); });
        ack_thread_ = std::thread([this] { ack_loop(); });
        epoch_thread_ = std::thread([this] { epoch_loop(); });
    } catch (const std::system_error& e) {
        stop();
        return sys_error("destination replication: starting its threads", e.code().value());
    }
    return {};
}

void Replicator::stop() {
    {
        std::lock_guard lock(mu_);
        stopping_ = true;
    }
    cv_.notify_all();
    bool joined = false;
    for (auto* t : {&epoch_thread_, &lease_thread_, &ack_thread_})
        if (t->joinable()) {
            t->join();
            joined = true;
        }
    if (joined && stats_.pause.summary().count > 0) {
        // Where the pauses went (p50/p99 ms of each step).
        auto f = [](const Histogram& h) {
            const auto s = h.summary();
            return fmt::format("{:.2f}/{:.2f}", s.p50_us / 1e3, s.p99_us / 1e3);
        };
        LZ_LOG(info, "replicator_pause_steps",
               "epochs={} pause={} park={} scan={} scan_copy_again={} device={} stage_rest={} unpark={} running_passes={} running_scan={} "
               "pages_prestaged={} pages_paused={}",
               stats_.pause.summary().count, f(stats_.pause), f(stats_.park), f(stats_.scan), f(stats_.filter),
               f(stats_.device), f(stats_.stage), f(stats_.unpark), f(stats_.prestage), f(stats_.prescan), stats_.prestaged_pages.get(),
               stats_.paused_pages.get());
    }
}

void Replicator::fail(const Error& e) {
    if (reported_.exchange(true)) return;
    {
        std::lock_guard lock(mu_);
        if (stopping_) return;  // an echo of the shutdown
    }
    if (on_error_) on_error_(e);
}

void Replicator::renew(Clock::time_point anchor) {
    std::lock_guard lock(mu_);
    if (fenced_.load()) return;  // a lapsed lease is never renewed: the source may have taken over
    lease_end_ = std::max(lease_end_, anchor + cfg_.lease);
    cv_.notify_all();
}

void Replicator::heartbeat_sent() {
    std::lock_guard lock(mu_);
    // Full ring: the newest send time is dropped, so a later echo is anchored at an
    // older send — earlier, never later than the truth.
    if (beat_count_ == beats_.size()) return;
    beats_[(beat_head_ + beat_count_++) % beats_.size()] = Clock::now();
}

void Replicator::heartbeat_echoed() {
    Clock::time_point at;
    {
        std::lock_guard lock(mu_);
        if (beat_count_ == 0) return;  // an echo of a beat sent before start(): no anchor
        at = beats_[beat_head_];
        beat_head_ = (beat_head_ + 1) % beats_.size();
        --beat_count_;
    }
    renew(at);
}

// ─── the lease ───────────────────────────────────────────────────────────────────────
void Replicator::lease_loop() {
    std::unique_lock lock(mu_);
    for (;;) {
        if (stopping_ || done_) return;
        const auto end = lease_end_;
        if (Clock::now() >= end) break;
        cv_.wait_until(lock, end);
    }
    const auto overdue = Clock::now() - lease_end_;
    lock.unlock();
    {
        // Output first: from here nothing is released; then the vCPUs. The epoch thread
        // holds vcpu_mu_ while it has them paused, so they are never resumed after this.
        std::lock_guard c(commit_mu_);
        {
            std::lock_guard lock(mu_);
            // RELEASE came after all (complete() ran): the source gave the VM up, even
            // if later than the lease; it never resumes it, so this copy runs on.
            if (done_ || stopping_) return;
        }
        fenced_ = true;
    }
    {
        std::lock_guard lock(mu_);  // wakes await_release()
    }
    cv_.notify_all();
    // A vCPU blocked on a page that has not arrived never parks (pause_vcpus would wait
    // for it, here or in an epoch's pause holding vcpu_mu_), and no page may arrive any
    // more: the source may resume the VM. Poisoning every missing page releases such a
    // vCPU (SIGBUS, as a memory error) and keeps late pages out (claimed, never placed).
    if (auto p = pager_.poison_missing(); !p)
        LZ_LOG(error, "replicator_fence_poison", "{}: a vCPU blocked on a missing page may keep the fence waiting",
               p.error().message());
    {
        std::lock_guard v(vcpu_mu_);
        hooks_.pause_vcpus();
    }
    LZ_LOG(warn, "replicator_fenced", "lease_ms={} overdue_ms={:.1f} committed={}", cfg_.lease.count(), ms(overdue),
           committed());
    fail(Error{ETIMEDOUT,
               fmt::format("destination: the lease lapsed (no renewal from the source within {} ms): vCPUs paused and "
                           "output held (fenced); the VM never resumes here, the source may resume it from epoch {}",
                           cfg_.lease.count(), committed()),
               ErrorClass::transport_lost});
}

// ─── acks ────────────────────────────────────────────────────────────────────────────
void Replicator::ack_loop() {
    net::FrameReader reader(*channel_);
    const std::string& where = reader.where();
    for (;;) {
        auto h = reader.next();
        if (!h) return fail(h.error());
        if (!*h) return fail(Error{ECONNRESET, fmt::format("{}: the source closed the connection", where),
                                   ErrorClass::transport_lost});
        auto payload = reader.read_control(**h);
        if (!payload) return fail(payload.error());
        if ((*h)->type == proto::Type::error) return fail(net::peer_error(*payload, where));
        if ((*h)->type == proto::Type::release) {
            if (!complete_sent_.load(std::memory_order_acquire))
                return fail(Error{0, fmt::format("{}: RELEASE before COMPLETE", where), ErrorClass::peer_violation});
            LZ_LOG(info, "replicator_released", "committed={}", committed());
            return complete();
        }
        if ((*h)->type != proto::Type::epoch_ack)
            return fail(Error{0, fmt::format("{}: unexpected {}", where, proto::to_string((*h)->type)),
                              ErrorClass::peer_violation});
        auto ack = proto::decode_epoch_ack(*payload);
        if (!ack) return fail(ack.error().wrap(where));
        Clock::time_point sent_at;
        {
            std::lock_guard lock(mu_);
            if (ack->epoch != committed() + 1 || ack->epoch > last_sent_)
                return fail(Error{0, fmt::format("{}: EPOCH_ACK {} after {} acknowledged and {} sent", where, ack->epoch,
                                                 committed(), last_sent_),
                                  ErrorClass::peer_violation});
            sent_at = end_sent_[ack->epoch % kMaxInFlight];
        }
        renew(sent_at);
        stats_.commit.record(static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - sent_at).count()));
        if (int e = failpoint::check("destination_epoch_committed", 0, ack->epoch, 0))
            return fail(Error{e, fmt::format("destination: failpoint destination_epoch_committed at epoch {}", ack->epoch)});
        commit(ack->epoch);
    }
}

void Replicator::commit(std::uint64_t n) {
    {
        std::lock_guard c(commit_mu_);
        std::unique_lock lock(mu_);
        const bool lapsed = Clock::now() >= lease_end_, done = done_;
        lock.unlock();
        if (done) return;  // complete() released everything
        if (fenced_ || lapsed) {
            LZ_LOG(warn, "replicator_commit_held", "epoch={} the lease lapsed: its output is not released", n);
            return;
        }
        committed_.store(n, std::memory_order_release);
        stats_.epochs_committed.add();
        if (hooks_.on_epoch_committed) hooks_.on_epoch_committed(n);
    }
    cv_.notify_all();  // an epoch slot is free
}

void Replicator::complete_sent() {
    complete_sent_.store(true, std::memory_order_release);
}

bool Replicator::await_release() {
    // The lease thread fences at the lease's end if RELEASE has not come: that bounds
    // this wait (the second bound only guards against a lease thread that ended early).
    std::unique_lock lock(mu_);
    const bool ended = cv_.wait_for(lock, cfg_.lease * 2 + std::chrono::seconds(1),
                                    [&] { return done_ || stopping_ || fenced_.load(); });
    return ended && done_ && !fenced_.load();
}

void Replicator::complete() {
    std::uint64_t n;
    {
        std::lock_guard lock(mu_);
        if (done_) return;
        done_ = true;
        n = open_epoch();  // final: run_epoch() opens none once done_ is set
    }
    cv_.notify_all();
    // The epoch thread may be inside an epoch: it ends at its next wait; the vCPUs it
    // paused it resumes first (vcpu_mu_ orders this after it).
    std::lock_guard c(commit_mu_);
    if (fenced_) return;
    LZ_LOG(info, "replicator_complete", "epoch={} committed={}", n, committed());
    if (hooks_.on_epoch_committed) hooks_.on_epoch_committed(n);
}

// ─── epochs ──────────────────────────────────────────────────────────────────────────
void Replicator::epoch_loop() {
    auto next = Clock::now() + cfg_.epoch;
    for (;;) {
        {
            std::unique_lock lock(mu_);
            // A tick waits for its time, and for a free slot among the in-flight epochs.
            cv_.wait_until(lock, next, [&] { return stopping_ || done_; });
            if (stopping_ || done_) return;
            if (last_sent_ - committed() >= kMaxInFlight) {
                stats_.skipped.add();
                next = Clock::now() + cfg_.epoch;
                continue;
            }
        }
        if (fenced_) return;
        if (auto r = run_epoch(); !r) return fail(r.error());
        next = Clock::now() + cfg_.epoch;
    }
}

// Sets in `bits` the pages written since the last scan (get-and-clear: they are write-
// protected again) and returns how many of them are present (the ones the epoch carries).
Result<std::uint64_t> Replicator::scan(Bitmaps& all) {
    const auto& regions = pager_.regions();
    std::uint64_t present = 0;
    for (std::uint32_t ri = 0; ri < regions.size(); ++ri) {
        const auto& r = regions[ri];
        auto& bits = all[ri];
        std::fill(bits.begin(), bits.end(), 0);
        const auto t0 = Clock::now();
        auto s = scan_.written(r.guest.host, r.guest.size, r.guest.page_size,
                               fmt::format("region {} '{}'", ri, r.guest.name), [&](std::uint64_t first, std::uint64_t count) {
                                   for (std::uint64_t p = first; p < first + count && p < r.pages; ++p)
                                       bits[p / 64] |= 1ull << (p % 64);
                               });
        if (!s) return std::unexpected(s.error().wrap("destination replication"));
        scan_ns_ += ns(Clock::now() - t0);
        for (std::size_t w = 0; w < bits.size(); ++w) {
            std::uint64_t word = bits[w];
            while (word) {
                const std::uint64_t p = w * 64 + static_cast<std::uint64_t>(std::countr_zero(word));
                word &= word - 1;
                auto st = r.state.get(p);
                if (st == PageState::placing) {
                    if (auto wt = wait_placed(ri, p, 1); !wt) return std::unexpected(wt.error());
                    st = r.state.get(p);
                }
                if (st == PageState::present) ++present;
                else bits[w] &= ~(1ull << (p % 64));
            }
        }
    }
    return present;
}

Result<void> Replicator::wait_placed(std::uint32_t ri, std::uint64_t p, std::uint64_t) {
    const auto& r = pager_.regions()[ri];
    const auto until = Clock::now() + kPlacingLimit;
    while (r.state.get(p) == PageState::placing) {
        if (Clock::now() >= until)
            return logic_error(fmt::format("destination replication: page {} of region {} '{}' stayed PLACING for {} ms",
                                           p, ri, r.guest.name, kPlacingLimit.count()));
        std::this_thread::yield();  // a placement is one ioctl away from done
    }
    return {};
}

// One process_vm_readv of the first `iovs` runs of local_iov_/remote_iov_.
Result<void> Replicator::read_guest(std::size_t iovs) {
    if (iovs == 0) return {};
    std::size_t want = 0;
    for (std::size_t i = 0; i < iovs; ++i) want += local_iov_[i].iov_len;
    const ssize_t n = ::process_vm_readv(::getpid(), local_iov_.data(), iovs, remote_iov_.data(), iovs, 0);
    if (n < 0) return LZ_SYS_ERROR("destination replication: process_vm_readv of {} runs of guest pages", iovs);
    if (static_cast<std::size_t>(n) != want)
        return logic_error(fmt::format("destination replication: process_vm_readv read {} of {} bytes", n, want));
    return {};
}

void Replicator::reset_staging() {
    pieces_.clear();
    used_ = 0;
}

// Appends to the staging area the pages set in `all`, from the cursor on, and clears
// their bits; returns true when every one is staged (false: the area is full, the
// cursor says where to go on).
Result<bool> Replicator::stage_next(Bitmaps& all, std::uint64_t& staged_pages) {
    staged_pages = 0;
    const auto& regions = pager_.regions();
    std::size_t iovs = 0;
    for (; cursor_region_ < regions.size(); ++cursor_region_, cursor_page_ = 0) {
        const auto& r = regions[cursor_region_];
        const std::size_t ps = r.guest.page_size;
        auto& bits = all[cursor_region_];
        std::uint64_t p = cursor_page_;
        while (p < r.pages) {
            const std::uint64_t word = bits[p / 64] >> (p % 64);
            if (word == 0) {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += static_cast<std::uint64_t>(std::countr_zero(word));
            if (p >= r.pages) break;
            std::uint64_t e = p + 1;
            while (e < r.pages && (bits[e / 64] >> (e % 64) & 1)) ++e;
            const std::uint64_t room = (staging_size_ - used_) / ps;
            if (room == 0) {
                cursor_page_ = p;
                if (auto f = read_guest(iovs); !f) return std::unexpected(f.error());
                return false;
            }
            const std::uint64_t take = std::min(e - p, room);
            for (std::uint64_t q = p; q < p + take; ++q) bits[q / 64] &= ~(1ull << (q % 64));
            local_iov_[iovs] = {staging_ + used_, take * ps};
            remote_iov_[iovs] = {r.host(p), take * ps};
            pieces_.push_back({cursor_region_, p, take, used_});
            used_ += take * ps;
            staged_pages += take;
            p += take;
            if (++iovs == kIovMax) {
                if (auto f = read_guest(iovs); !f) return std::unexpected(f.error());
                iovs = 0;
            }
        }
    }
    if (auto f = read_guest(iovs); !f) return std::unexpected(f.error());
    return true;
}

// One pass, vCPUs running or paused: a get-and-clear scan into fresh_; every staged
// page it reports is copied again into its slot; the others join the epoch (epoch_) and
// what is left to stage (unstaged_). Returns the pages new to the epoch; `copied` counts
// the pages copied again.
Result<std::uint64_t> Replicator::pass(std::uint64_t& copied) {
    scan_ns_ = 0;
    if (auto f = scan(fresh_); !f) return std::unexpected(f.error());
    const auto& regions = pager_.regions();
    std::size_t iovs = 0;
    copied = 0;
    for (const auto& piece : pieces_) {
        const auto& r = regions[piece.region];
        const std::size_t ps = r.guest.page_size;
        auto& bits = fresh_[piece.region];
        for (std::uint64_t p = piece.first, end = piece.first + piece.count; p < end;) {
            const std::uint64_t word = bits[p / 64] >> (p % 64);
            if (word == 0) {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += static_cast<std::uint64_t>(std::countr_zero(word));
            if (p >= end) break;
            std::uint64_t e = p + 1;
            while (e < end && (bits[e / 64] >> (e % 64) & 1)) ++e;
            for (std::uint64_t q = p; q < e; ++q) bits[q / 64] &= ~(1ull << (q % 64));
            local_iov_[iovs] = {staging_ + piece.offset + (p - piece.first) * ps, (e - p) * ps};
            remote_iov_[iovs] = {r.host(p), (e - p) * ps};
            copied += e - p;
            p = e;
            if (++iovs == kIovMax) {
                if (auto f = read_guest(iovs); !f) return std::unexpected(f.error());
                iovs = 0;
            }
        }
    }
    if (auto f = read_guest(iovs); !f) return std::unexpected(f.error());
    std::uint64_t added = 0;
    for (std::uint32_t ri = 0; ri < regions.size(); ++ri) {
        auto& fresh = fresh_[ri];
        auto& epoch = epoch_[ri];
        auto& unstaged = unstaged_[ri];
        for (std::size_t w = 0; w < fresh.size(); ++w) {
            if (fresh[w] == 0) continue;
            added += static_cast<std::uint64_t>(std::popcount(fresh[w] & ~epoch[w]));
            epoch[w] |= fresh[w];
            unstaged[w] |= fresh[w];
        }
    }
    return added;
}

// EPOCH_PAGES frames of the staged pieces, each checksummed like PAGES.
Result<void> Replicator::send_staged(std::uint64_t n, std::uint32_t& frames, std::uint32_t& sum, std::uint64_t pages) {
    const auto& regions = pager_.regions();
    std::array<std::byte, proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8> head{};
    for (const auto& piece : pieces_) {
        const std::size_t ps = regions[piece.region].guest.page_size;
        for (std::uint64_t done = 0; done < piece.count;) {
            const auto count = static_cast<std::uint32_t>(std::min<std::uint64_t>(piece.count - done, proto::kMaxPagesPerFrame));
            const std::byte* data = staging_ + piece.offset + done * ps;
            for (std::uint32_t i = 0; i < count; ++i) ptrs_[i] = data + std::size_t(i) * ps;
            crc32c_pages(ptrs_.data(), count, ps, crcs_.data());
            proto::PagesMeta meta;
            meta.region = piece.region;
            meta.count = count;
            meta.first = piece.first + done;
            const std::size_t hl = proto::encode_pages_head(head.data(), meta, ps, std::span(crcs_.data(), count),
                                                            proto::Type::epoch_pages);
            std::uint32_t frame_sum;
            std::memcpy(&frame_sum, head.data() + 12, 4);
            if (int e = failpoint::check("destination_epoch_send", 0, n, static_cast<std::uint32_t>(pages)))
                return sys_error(fmt::format("destination: failpoint destination_epoch_send in epoch {}", n), e);
            const iovec iov[2] = {{head.data(), hl}, {const_cast<std::byte*>(data), std::size_t(count) * ps}};
            if (auto s = channel_->send(iov); !s) return s;
            sum = proto::epoch_fold(sum, frame_sum);
            ++frames;
            stats_.bytes.add(hl + std::size_t(count) * ps);
            done += count;
        }
    }
    return {};
}

Result<void> Replicator::run_epoch() {
    // While the vCPUs run: what they wrote since the last pause, staged (replicator.hpp
    // says why a copy made now is the epoch's wherever a later scan does not object);
    // again while a pass copied many pages, since the vCPUs wrote on meanwhile.
    const auto pre_at = Clock::now();
    for (auto* b : {&epoch_, &unstaged_})
        for (auto& bits : *b) std::fill(bits.begin(), bits.end(), 0);
    reset_staging();
    std::uint64_t epoch_pages = 0, prescan_ns = 0, last = UINT64_MAX;
    for (int i = 0; i < kRunningPasses; ++i) {
        std::uint64_t copied = 0, staged = 0;
        auto added = pass(copied);
        if (!added) return std::unexpected(added.error());
        prescan_ns += scan_ns_;
        epoch_pages += *added;
        cursor_region_ = 0;
        cursor_page_ = 0;
        if (auto all = stage_next(unstaged_, staged); !all) return std::unexpected(all.error());
        stats_.prestaged_pages.add(copied + staged);
        // Few pages left for the pause, or the vCPUs wrote as many as the pass copied
        // (another pass would not shrink the pause, only cost them faults): pause now.
        if (copied + staged <= kPausedPages || copied + staged > last / 2) break;
        last = copied + staged;
    }
    stats_.prestage.record(ns(Clock::now() - pre_at));
    stats_.prescan.record(prescan_ns);
    {
        std::lock_guard lock(mu_);
        if (stopping_ || done_) return {};  // complete(): no epoch any more
    }

    std::unique_lock vcpus(vcpu_mu_);
    if (fenced_) return {};
    const auto paused_at = Clock::now();
    hooks_.pause_vcpus();
    auto step_at = Clock::now();
    stats_.park.record(ns(step_at - paused_at));
    auto step = [&](Histogram& h) {
        const auto now = Clock::now();
        h.record(ns(now - step_at));
        step_at = now;
    };
    bool paused = true;
    auto resume = [&] {
        if (!paused) return;
        step(stats_.stage);
        hooks_.resume_vcpus();
        paused = false;
        const auto now = Clock::now();
        stats_.unpark.record(ns(now - step_at));
        stats_.pause.record(ns(now - paused_at));
        vcpus.unlock();
    };
    std::uint64_t n;
    {
        // Under mu_ with complete(): RELEASE releases the output of the open epoch it
        // reads, so no epoch may open after it (its output would be held for good).
        std::lock_guard lock(mu_);
        if (stopping_ || done_) {
            resume();
            return {};
        }
        n = open_.fetch_add(1, std::memory_order_acq_rel);
    }
    std::uint64_t copied = 0;
    auto added = pass(copied);
    if (!added) return std::unexpected(added.error());
    epoch_pages += *added;
    stats_.paused_pages.add(copied);
    stats_.scan.record(scan_ns_);
    step(stats_.filter);  // the scan, its page-state filter and the copies of staged pages again
    std::vector<std::byte> device;
    if (hooks_.save_device_state) {
        auto d = hooks_.save_device_state();
        if (!d) return std::unexpected(d.error().wrap(fmt::format("destination: save_device_state for epoch {}", n)));
        device = std::move(*d);
    }
    step(stats_.device);
    auto pages = &epoch_pages;  // the epoch's page count, as EPOCH_BEGIN announces it
    cursor_region_ = 0;
    cursor_page_ = 0;
    std::uint32_t frames = 0, sum = 0;
    bool begun = false;
    for (;;) {
        std::uint64_t staged = 0;
        auto all = stage_next(unstaged_, staged);
        if (!all) return std::unexpected(all.error());
        stats_.paused_pages.add(staged);
        if (*all) resume();  // the whole epoch is a snapshot now: the VM runs on
        else if (!begun) {
            stats_.overflows.add();
            LZ_LOG(warn, "replicator_staging_full", "epoch={} pages={} staging_bytes={}: vCPUs stay paused while the "
                   "staged part is sent", n, *pages, staging_size_);
        }
        if (!begun) {
            if (int e = failpoint::check("destination_epoch_send", 0, n, static_cast<std::uint32_t>(*pages)))
                return sys_error(fmt::format("destination: failpoint destination_epoch_send in epoch {}", n), e);
            if (auto s = net::send_frame(*channel_, proto::encode(proto::EpochBegin{n, *pages, device.size()})); !s)
                return s;
            begun = true;
        }
        if (auto s = send_staged(n, frames, sum, *pages); !s) return s;
        reset_staging();
        if (*all) break;
    }
    const auto dev = proto::encode_epoch_device(device);
    std::uint32_t dev_sum;
    std::memcpy(&dev_sum, dev.data() + 12, 4);
    if (int e = failpoint::check("destination_epoch_send", 0, n, static_cast<std::uint32_t>(*pages)))
        return sys_error(fmt::format("destination: failpoint destination_epoch_send in epoch {}", n), e);
    if (auto s = net::send_frame(*channel_, dev); !s) return s;
    sum = proto::epoch_fold(sum, dev_sum);
    ++frames;
    if (int e = failpoint::check("destination_epoch_send", 0, n, static_cast<std::uint32_t>(*pages)))
        return sys_error(fmt::format("destination: failpoint destination_epoch_send in epoch {}", n), e);
    {
        std::lock_guard lock(mu_);
        end_sent_[n % kMaxInFlight] = Clock::now();  // the anchor of the renewal its ack brings
        last_sent_ = n;
    }
    if (auto s = net::send_frame(*channel_, proto::encode(proto::EpochEnd{n, frames, sum})); !s) return s;
    stats_.epochs_sent.add();
    stats_.pages.add(*pages);
    stats_.bytes.add(device.size());
    stats_.last_pages.store(*pages, std::memory_order_relaxed);
    if (*pages > stats_.largest_pages.load(std::memory_order_relaxed))
        stats_.largest_pages.store(*pages, std::memory_order_relaxed);
    return {};
}

}  // namespace lazymig::pager
