// Dirty tracking: userfaultfd write-protect (WP_ASYNC + PAGEMAP_SCAN, or synchronous) and
// the VMM's own log. The contract is in dirty_tracker.hpp.
#include "precopy/dirty_tracker.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "src/errors.hpp"
#include "src/log.hpp"
#include "src/net/socket.hpp"
#include "src/pagemap_scan.hpp"
#include "uffd/uffd.hpp"

namespace lazymig::source {

DirtySet::DirtySet(std::span<const GuestRegion> regions) {
    for (const auto& r : regions) {
        pages_.push_back(r.size / r.page_size);
        words_.emplace_back((pages_.back() + 63) / 64, 0);
    }
}

void DirtySet::set_range(std::uint32_t region, std::uint64_t first, std::uint64_t count) {
    for (std::uint64_t p = first; p < first + count; ++p) set(region, p);
}

std::uint64_t DirtySet::count() const {
    std::uint64_t n = 0;
    for (const auto& w : words_)
        for (auto x : w) n += static_cast<std::uint64_t>(std::popcount(x));
    return n;
}

void DirtySet::clear() {
    for (auto& w : words_) std::fill(w.begin(), w.end(), 0);
}

void DirtySet::for_each_run(std::uint32_t region, const std::function<void(std::uint64_t, std::uint64_t)>& fn) const {
    const auto& w = words_[region];
    const std::uint64_t pages = pages_[region];
    std::uint64_t p = 0;
    while (p < pages) {
        const std::uint64_t word = w[p / 64] >> (p % 64);
        if (word == 0) {  // skip to the next word
            p = (p / 64 + 1) * 64;
            continue;
        }
        p += static_cast<std::uint64_t>(std::countr_zero(word));
        if (p >= pages) break;
        std::uint64_t e = p + 1;
        while (e < pages && test(region, e)) ++e;
        fn(p, e - p);
        p = e;
    }
}

namespace {

// The UFFD_FEATURE_* bits write-protecting `regions` needs, WP_ASYNC aside.
std::uint64_t wp_features(std::span<const GuestRegion> regions) {
    std::uint64_t f = 0;
    for (const auto& r : regions) {
        if (r.backing == Backing::anon) f |= UFFD_FEATURE_WP_UNPOPULATED;
        else f |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    }
    return f;
}

// A userfaultfd with every region registered for write-protect and protected.
struct WpRegistration {
    uffd::Uffd uffd;
    std::vector<GuestRegion> regions;
    bool registered = false;

    Result<void> arm() {
        for (std::size_t i = 0; i < regions.size(); ++i) {
            const auto& r = regions[i];
            auto reg = uffd.register_range(r.host, r.size, UFFDIO_REGISTER_MODE_WP);
            if (!reg) {
                unregister(i);
                return std::unexpected(reg.error().wrap(fmt::format("dirty tracking: region {} '{}'", i, r.name)));
            }
            if (auto wp = uffd.writeprotect(r.host, r.size, true); !wp) {
                unregister(i + 1);
                return std::unexpected(wp.error().wrap(fmt::format("dirty tracking: region {} '{}'", i, r.name)));
            }
        }
        registered = true;
        return {};
    }
    // Unregistering drops the protection and wakes every writer blocked on it.
    void unregister(std::size_t count) noexcept {
        for (std::size_t i = 0; i < count; ++i)
            if (auto u = uffd.unregister_range(regions[i].host, regions[i].size); !u)
                LZ_LOG(warn, "dirty_unregister_failed", "region={} {}", i, u.error().message());
    }
    void disarm() noexcept {
        if (!registered) return;
        registered = false;
        unregister(regions.size());
    }
};

Result<uffd::Uffd> open_wp(std::span<const GuestRegion> regions, bool async) {
    const std::uint64_t want = wp_features(regions) | (async ? UFFD_FEATURE_WP_ASYNC : 0);
    auto u = uffd::Uffd::open(want);
    if (!u) return std::unexpected(u.error().wrap(async ? "dirty tracking wp-async" : "dirty tracking wp-sync"));
    return u;
}

// ─── wp_async ────────────────────────────────────────────────────────────────────────
class AsyncTracker final : public DirtyTracker {
public:
    AsyncTracker(std::vector<GuestRegion> regions, uffd::Uffd u, PagemapScan scan)
        : wp_{std::move(u), std::move(regions)}, scan_(std::move(scan)) {}
    ~AsyncTracker() override { stop(); }
    DirtyTracking method() const override { return DirtyTracking::wp_async; }
    Result<void> start() override { return wp_.arm(); }
    void stop() noexcept override { wp_.disarm(); }

    // One ioctl per region and per batch of written runs: reports and re-protects in one walk.
    Result<void> collect(DirtySet& out) override {
        for (std::uint32_t ri = 0; ri < wp_.regions.size(); ++ri) {
            const auto& r = wp_.regions[ri];
            auto s = scan_.written(r.host, r.size, r.page_size, fmt::format("region {} '{}'", ri, r.name),
                                   [&](std::uint64_t first, std::uint64_t count) { out.set_range(ri, first, count); });
            if (!s) return std::unexpected(s.error().wrap("dirty tracking"));
        }
        return {};
    }

private:
    WpRegistration wp_;
    PagemapScan scan_;
};

// ─── wp_sync ─────────────────────────────────────────────────────────────────────────
// The fault thread sets a page's bit, then un-protects it (which lets the write
// complete); collect() takes the bits, then protects those pages again. Each pair runs
// under `mu_`: were they to interleave, an un-protect could land after collect()'s
// re-protect and leave the page writable with its bit already taken (a write lost), or
// — bit set after the un-protect — a write could complete before its bit was set and
// be missed by the collect() that ran right after it.
class SyncTracker final : public DirtyTracker {
public:
    SyncTracker(std::vector<GuestRegion> regions, uffd::Uffd u, net::ShutdownEvent stop)
        : wp_{std::move(u), std::move(regions)}, stop_(std::move(stop)) {
        for (const auto& r : wp_.regions) {
            const std::uint64_t pages = r.size / r.page_size;
            bits_.push_back(std::make_unique<std::atomic<std::uint64_t>[]>((pages + 63) / 64));
        }
    }
    ~SyncTracker() override { stop(); }
    DirtyTracking method() const override { return DirtyTracking::wp_sync; }

    Result<void> start() override {
        if (auto a = wp_.arm(); !a) return a;
        try {
            thread_ = std::thread([this] { run(); });
        } catch (const std::system_error& e) {
            wp_.disarm();
            return sys_error("dirty tracking wp-sync: starting the fault thread", e.code().value());
        }
        return {};
    }

    // Unregister first: it wakes the writers blocked in a fault the thread has not read.
    void stop() noexcept override {
        wp_.disarm();
        stop_.signal();
        if (thread_.joinable()) thread_.join();
    }

    Result<void> collect(DirtySet& out) override {
        if (auto e = failed(); !e) return e;
        std::lock_guard lock(wp_mu_);
        for (std::uint32_t ri = 0; ri < wp_.regions.size(); ++ri) {
            const auto& r = wp_.regions[ri];
            auto words = out.words(ri);
            auto* host = static_cast<std::byte*>(r.host);
            for (std::size_t w = 0; w < words.size(); ++w) {
                std::uint64_t got = bits_[ri][w].exchange(0, std::memory_order_acq_rel);
                words[w] |= got;
                while (got) {  // re-protect each run of taken bits with one ioctl
                    const unsigned b = static_cast<unsigned>(std::countr_zero(got));
                    const unsigned len = static_cast<unsigned>(std::countr_one(got >> b));
                    const std::uint64_t first = w * 64 + b;
                    if (auto p = wp_.uffd.writeprotect(host + first * r.page_size, len * r.page_size, true); !p)
                        return std::unexpected(p.error().wrap(fmt::format("dirty tracking wp-sync: region {} '{}'", ri, r.name)));
                    got = len == 64 ? 0 : got & ~(((1ull << len) - 1) << b);
                }
            }
        }
        return {};
    }

private:
    Result<void> failed() {
        std::lock_guard lock(mu_);
        if (error_) return std::unexpected(*error_);
        return {};
    }

    void run() {
        std::array<uffd::Event, 64> batch;
        for (;;) {
            pollfd fds[2] = {{stop_.fd(), POLLIN, 0}, {wp_.uffd.fd(), POLLIN, 0}};
            if (::poll(fds, 2, -1) < 0) {
                if (errno == EINTR) continue;
                return fail(Error{errno, "dirty tracking wp-sync: poll on the userfaultfd"});
            }
            if (fds[0].revents) return;
            auto got = wp_.uffd.read_events(batch);
            if (!got) return fail(got.error());
            for (std::size_t i = 0; i < *got; ++i) {
                const auto& ev = batch[i];
                if (ev.kind != uffd::Event::Kind::pagefault) continue;
                if (auto r = record(ev.address); !r) return fail(r.error());
            }
        }
    }

    Result<void> record(std::uint64_t address) {
        for (std::uint32_t ri = 0; ri < wp_.regions.size(); ++ri) {
            const auto& r = wp_.regions[ri];
            const auto base = reinterpret_cast<std::uint64_t>(r.host);
            if (address < base || address >= base + r.size) continue;
            const std::uint64_t page = (address - base) / r.page_size;
            std::lock_guard lock(wp_mu_);
            bits_[ri][page / 64].fetch_or(1ull << (page % 64), std::memory_order_acq_rel);
            if (auto u = wp_.uffd.writeprotect(reinterpret_cast<void*>(base + page * r.page_size), r.page_size, false); !u)
                return std::unexpected(u.error().wrap("dirty tracking wp-sync: releasing a write"));
            return {};
        }
        return logic_error(fmt::format("dirty tracking wp-sync: fault at {:#x} outside every region", address));
    }

    // The thread stops; writers are released so the guest does not hang on a dead
    // tracker, and the next collect() reports the error.
    void fail(const Error& e) {
        LZ_LOG(error, "dirty_sync_failed", "{}", e.message());
        {
            std::lock_guard lock(mu_);
            error_ = e;
        }
        wp_.disarm();
    }

    WpRegistration wp_;
    net::ShutdownEvent stop_;
    std::vector<std::unique_ptr<std::atomic<std::uint64_t>[]>> bits_;
    std::mutex wp_mu_;  // a fault's record + un-protect against collect()'s take + re-protect
    std::mutex mu_;
    std::optional<Error> error_;
    std::thread thread_;
};

// ─── vmm ─────────────────────────────────────────────────────────────────────────────
class VmmTracker final : public DirtyTracker {
public:
    VmmTracker(std::vector<GuestRegion> regions, DirtyLogFn log) : regions_(std::move(regions)), log_(std::move(log)) {}
    DirtyTracking method() const override { return DirtyTracking::vmm; }
    // The first call clears the VMM's log; what it reports predates tracking.
    Result<void> start() override {
        DirtySet discard(regions_);
        return collect(discard);
    }
    Result<void> collect(DirtySet& out) override {
        for (std::uint32_t ri = 0; ri < regions_.size(); ++ri)
            if (auto r = log_(ri, out.words(ri)); !r)
                return std::unexpected(r.error().wrap(fmt::format("dirty tracking: the VMM's log of region {} '{}'", ri,
                                                                  regions_[ri].name)));
        return {};
    }
    void stop() noexcept override {}

private:
    std::vector<GuestRegion> regions_;
    DirtyLogFn log_;
};

Result<PagemapScan> open_pagemap() {
    auto scan = PagemapScan::open();
    if (!scan) return std::unexpected(scan.error().wrap("dirty tracking wp-async"));
    return scan;
}

}  // namespace

Result<void> probe_dirty_tracking(std::span<const GuestRegion> regions, DirtyTracking method) {
    if (method == DirtyTracking::vmm || method == DirtyTracking::automatic) return {};
    if (method != DirtyTracking::wp_async && method != DirtyTracking::wp_sync)
        return logic_error("dirty tracking: invalid method");
    auto f = uffd::Uffd::probe();
    if (!f) return std::unexpected(f.error());
    const std::uint64_t want = wp_features(regions) | (method == DirtyTracking::wp_async ? UFFD_FEATURE_WP_ASYNC : 0);
    if (!f->has(want))
        return logic_error(fmt::format("dirty tracking {}: userfaultfd: kernel lacks {}",
                                       method == DirtyTracking::wp_async ? "wp-async" : "wp-sync", f->missing(want)));
    if (method == DirtyTracking::wp_async) {
        if (auto pm = open_pagemap(); !pm) return std::unexpected(pm.error());
    }
    return {};
}

Result<std::unique_ptr<DirtyTracker>> make_dirty_tracker(std::span<const GuestRegion> regions, DirtyTracking method,
                                                         DirtyLogFn vmm_log) {
    if (method == DirtyTracking::automatic) {
        if (vmm_log) method = DirtyTracking::vmm;
        else method = probe_dirty_tracking(regions, DirtyTracking::wp_async) ? DirtyTracking::wp_async : DirtyTracking::wp_sync;
    }
    std::vector<GuestRegion> copy(regions.begin(), regions.end());
    switch (method) {
    case DirtyTracking::vmm:
        if (!vmm_log) return logic_error("dirty tracking vmm: SourceConfig::dirty_log is not set");
        return std::make_unique<VmmTracker>(std::move(copy), std::move(vmm_log));
    case DirtyTracking::wp_async: {
        if (auto p = probe_dirty_tracking(regions, method); !p) return std::unexpected(p.error());
        auto u = open_wp(regions, true);
        if (!u) return std::unexpected(u.error());
        auto pm = open_pagemap();
        if (!pm) return std::unexpected(pm.error());
        return std::make_unique<AsyncTracker>(std::move(copy), std::move(*u), std::move(*pm));
    }
    case DirtyTracking::wp_sync: {
        if (auto p = probe_dirty_tracking(regions, method); !p) return std::unexpected(p.error());
        auto u = open_wp(regions, false);
        if (!u) return std::unexpected(u.error());
        auto stop = net::ShutdownEvent::create();
        if (!stop) return std::unexpected(stop.error());
        return std::make_unique<SyncTracker>(std::move(copy), std::move(*u), std::move(*stop));
    }
    default: return logic_error("dirty tracking: invalid method");
    }
}

}  // namespace lazymig::source
