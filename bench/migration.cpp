// The benchmarked migration's endpoints: a source server and one destination per run.
#include "bench/migration.hpp"

#include <random>

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "bench/plot.hpp"

namespace bench {
namespace {

using lazymig::Backing;

// Calls `tick` every 10 ms on its own thread until stopped: RSS peaks between the
// before and after readings are only seen this way.
class Sampler {
public:
    explicit Sampler(std::function<void()> tick) : tick_(std::move(tick)) {
        thread_ = std::thread([this] {
            ::pthread_setname_np(::pthread_self(), "bench-sampler");
            std::unique_lock lock(mu_);
            while (!cv_.wait_for(lock, std::chrono::milliseconds(10), [this] { return stop_; })) {
                lock.unlock();
                tick_();
                lock.lock();
            }
        });
    }
    ~Sampler() { stop(); }
    void stop() {
        {
            std::lock_guard lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        if (thread_.joinable()) thread_.join();
    }

private:
    std::function<void()> tick_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool stop_ = false;
    std::thread thread_;
};

void max_into(std::atomic<std::int64_t>& m, std::int64_t v) {
    auto cur = m.load(std::memory_order_relaxed);
    while (v > cur && !m.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
    }
}

// Growth of the memory this process holds: anonymous and shared (memfd) pages. File
// pages (RssFile) are left out: they are the library's code being paged in on first use,
// shared with every other process, not memory the migration costs.
std::int64_t memory_growth(const Rss& before, const Rss& after) {
    return std::int64_t(after.anon + after.shmem) - std::int64_t(before.anon + before.shmem);
}

Fields latency_fields(const std::string& prefix, const Percentiles& p) {
    Fields f;
    f.set(prefix + "_p50_us", p.p50_us)
        .set(prefix + "_p99_us", p.p99_us)
        .set(prefix + "_p999_us", p.p999_us)
        .set(prefix + "_max_us", p.max_us)
        .set(prefix + "_mean_us", p.mean_us)
        .set(prefix + "_count", p.count);
    return f;
}

Fields latency_fields(const std::string& prefix, const lazymig::LatencySummary& p) {
    return latency_fields(prefix, Percentiles{p.count, p.p50_us, p.p99_us, p.p999_us, p.max_us, p.mean_us});
}

// --- source ---------------------------------------------------------------------------

Fields migrate_once(lazymig::GuestMemory& mem, const Fields& cmd, LineReader& commands) {
    const Rss r0 = read_rss();
    std::atomic<std::int64_t> peak{0};
    Sampler sampler([&] { max_into(peak, memory_growth(r0, read_rss())); });

    // Hook times (CLOCK_MONOTONIC, comparable across processes) split the downtime:
    // entry and exit of each hook, and when the source heard RESUMED (the postcopy event).
    std::atomic<std::uint64_t> paused_ns{0}, pause_done_ns{0}, saved_ns{0}, save_done_ns{0}, resumed_seen_ns{0};
    lazymig::VmmHooks hooks{
        .pause_vcpus = [&] { paused_ns = now_ns(); pause_done_ns = now_ns(); },
        .resume_vcpus = [] {},
        .save_device_state = [&]() -> lazymig::Result<std::vector<std::byte>> {
            saved_ns = now_ns();
            std::vector<std::byte> blob(4096, std::byte{0x42});
            save_done_ns = now_ns();
            return blob;
        },
        .load_device_state = {},
        .on_epoch_committed = {},
        .on_event =
            [&](const lazymig::Event& e) {
                if (e.kind == lazymig::Event::Kind::phase && e.phase == lazymig::Phase::postcopy)
                    resumed_seen_ns = now_ns();
            },
    };
    lazymig::Parameters params;
    params.max_bandwidth = static_cast<std::uint64_t>(cmd.num("max_bandwidth"));
    params.bulk_channels = static_cast<std::uint32_t>(cmd.num("bulk_channels"));
    auto s = lazymig::Source::create({.regions = {mem.region()}, .hooks = hooks,
                                      .uri = "tcp:127.0.0.1:" + cmd.str("port"), .mode = lazymig::Mode::postcopy,
                                      .parameters = params, .security = bench_security(cmd.num("tls") != 0)});
    if (!s) return Fields().set_str("error", "source: " + s.error().message());
    if (auto m = (*s)->migrate(); !m) return Fields().set_str("error", "source: " + m.error().message());
    (void)commands.next();  // "release", or end of file if the orchestrator gave up
    (*s)->set_parameters(lazymig::Parameters{.bulk_channels = params.bulk_channels});
    auto done = (*s)->wait();
    const lazymig::Stats st = (*s)->stats();
    const Rss r1 = read_rss();
    sampler.stop();
    max_into(peak, memory_growth(r0, r1));

    Fields f;
    if (!done) f.set_str("error", "source: " + done.error().message());
    f.set("src_downtime_ms", st.downtime_ms)
        .set("src_paused_ns", paused_ns.load())
        .set("src_pause_done_ns", pause_done_ns.load())
        .set("src_saved_ns", saved_ns.load())
        .set("src_save_done_ns", save_done_ns.load())
        .set("src_resumed_seen_ns", resumed_seen_ns.load())
        .set("src_bulk_channels", std::uint64_t(st.bulk_channels))
        .set("src_elapsed_ms", st.elapsed_ms)
        .set("src_pages_pushed", st.pages_pushed)
        .set("src_pages_demanded", st.pages_demanded)
        .set("src_requests", st.requests)
        .set("src_zero_pages", st.zero_pages)
        .set("src_bytes_sent", st.bytes_sent)
        .set("src_rss_growth_bytes", double(std::int64_t(r1.rss) - std::int64_t(r0.rss)))
        .set("src_file_growth_bytes", double(std::int64_t(r1.file) - std::int64_t(r0.file)))
        .set("src_overhead_peak_bytes", double(peak.load()))
        .set("src_bound_bytes", source_bound(mem.size(), st.bulk_channels));
    return f;
}

// --- destination ----------------------------------------------------------------------

// Touch threads: each reads the first word of random pages of its share (page % n == t)
// that were not present a moment before (per /proc/self/pagemap), timing the read.
struct Touchers {
    const DestinationSpec& spec;
    std::byte* guest = nullptr;
    std::uint64_t pages = 0;
    std::atomic<int> state{0};             // 0 wait, 1 go, 2 stop
    std::atomic<bool> complete{false};     // every page present: nothing left to fault on
    std::uint64_t resumed_ns = 0;
    std::vector<std::uint8_t> touched;     // bench memory, allocated before the RSS baseline
    std::vector<std::vector<std::uint32_t>> ns;
    std::vector<std::uint64_t> skipped, errors, scans;
    std::vector<std::thread> threads;

    Touchers(const DestinationSpec& s, std::byte* g, std::uint64_t n) : spec(s), guest(g), pages(n) {
        const int t = spec.touchers;
        if (t == 0) return;
        touched.assign(pages, 0);
        ns.resize(t);
        for (auto& v : ns) v.assign(spec.max_samples / t + 1, 0);  // populated now, not while measured
        skipped.assign(t, 0);
        errors.assign(t, 0);
        scans.assign(t, 0);
        for (int i = 0; i < t; ++i) threads.emplace_back([this, i] { run(i); });
    }
    ~Touchers() { stop_and_join(); }

    void go(std::uint64_t at) {
        resumed_ns = at;
        state.store(1, std::memory_order_release);
        state.notify_all();
    }
    void stop_and_join() {
        if (state.load() == 0) {
            state.store(2);
            state.notify_all();
        }
        for (auto& th : threads)
            if (th.joinable()) th.join();
    }

    void run(int t) {
        ::pthread_setname_np(::pthread_self(), fmt::format("bench-touch{}", t).c_str());
        state.wait(0);
        if (state.load(std::memory_order_acquire) != 1) return;
        const int n = spec.touchers;
        const int pagemap = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        if (pagemap < 0) {
            ++errors[t];
            return;
        }
        auto& out = ns[t];
        const std::uint64_t cap = out.size() - 1;
        const std::uint64_t share = pages / n;
        const std::uint64_t deadline = resumed_ns + static_cast<std::uint64_t>(spec.max_seconds * 1e9);
        std::uint64_t x = 0x2545F4914F6CDD1Dull * (t + 1), recorded = 0, present_run = 0;
        while (recorded < cap && !complete.load(std::memory_order_relaxed) && present_run < 200000) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            const std::uint64_t p = (x % share) * n + t;
            ++scans[t];
            if (touched[p]) continue;
            touched[p] = 1;
            std::byte* addr = guest + p * kPage;
            std::uint64_t entry = 0;
            if (::pread(pagemap, &entry, sizeof entry, static_cast<off_t>(reinterpret_cast<std::uintptr_t>(addr) / kPage * 8)) !=
                sizeof entry) {
                ++errors[t];
                break;
            }
            if (entry >> 63) {  // present already: no fault to measure
                ++skipped[t];
                ++present_run;
                continue;
            }
            present_run = 0;
            const std::uint64_t t0 = now_ns();
            const std::uint64_t v = *reinterpret_cast<volatile std::uint64_t*>(addr);
            const std::uint64_t t1 = now_ns();
            out[recorded++] = static_cast<std::uint32_t>(t1 - t0);
            if (v != content_word(p * (kPage / 8))) ++errors[t];
            if (t1 > deadline) break;
        }
        out.resize(recorded);
        ::close(pagemap);
    }
};

// Checks one word of every 16th page (and every page's first word if `all`).
std::uint64_t verify(const std::byte* guest, std::uint64_t pages) {
    std::uint64_t bad = 0;
    const auto* w = reinterpret_cast<const std::uint64_t*>(guest);
    for (std::uint64_t p = 0; p < pages; p += 16) {
        const std::uint64_t i = p * (kPage / 8) + (p * 7) % (kPage / 8);
        bad += w[i] != content_word(i);
    }
    return bad;
}

}  // namespace

int source_server(const SourceSpec& spec, int command_fd, int report_fd) {
    auto mem = lazymig::GuestMemory::create("ram0", spec.bytes, spec.backing, true);
    if (!mem) {
        emit(report_fd, Fields().set_str("error", "source guest memory: " + mem.error().message()));
        return 1;
    }
    const std::uint64_t t0 = now_ns();
    fill_content(mem->data(), spec.bytes);
    emit(report_fd, Fields().set_str("ready", "1").set("fill_ms", double(now_ns() - t0) / 1e6));
    LineReader commands(command_fd);
    while (auto cmd = commands.next()) {
        if (cmd->has("quit")) break;
        if (cmd->has("run")) emit(report_fd, migrate_once(*mem, *cmd, commands));
    }
    return 0;
}

int destination_run(const DestinationSpec& spec, int, int report_fd) {
    auto mem = lazymig::GuestMemory::create("ram0", spec.bytes, spec.backing, false);
    if (!mem) {
        emit(report_fd, Fields().set_str("error", "destination guest memory: " + mem.error().message()));
        return 1;
    }
    const std::uint64_t pages = spec.bytes / kPage;
    Touchers touchers(spec, mem->data(), pages);
    // 0 until the session thread resumes the "vCPUs" (or the migration ends first: 1).
    std::atomic<std::uint64_t> resumed_ns{0}, resume_done_ns{0}, loaded_ns{0}, load_done_ns{0};
    auto wake = [&](std::uint64_t v) {
        std::uint64_t zero = 0;
        if (resumed_ns.compare_exchange_strong(zero, v)) resumed_ns.notify_all();
    };
    lazymig::VmmHooks hooks{
        .pause_vcpus = [] {},
        .resume_vcpus = [&] {
            wake(now_ns());
            resume_done_ns = now_ns();
        },
        .save_device_state = {},
        .load_device_state = [&](std::span<const std::byte>) -> lazymig::Result<void> {
            loaded_ns = now_ns();
            load_done_ns = now_ns();
            return {};
        },
        .on_epoch_committed = {},
        .on_event =
            [&](const lazymig::Event& e) {
                if (e.phase == lazymig::Phase::failed || e.phase == lazymig::Phase::cancelled) wake(1);
            },
    };

    const Rss r0 = read_rss();  // baseline: guest RAM mapped but empty, bench memory populated
    const std::uint64_t l0 = now_ns();
    auto d = lazymig::Destination::listen({.regions = {mem->region()}, .hooks = hooks, .uri = "tcp:127.0.0.1:0",
                                           .parameters = {.bulk_channels = spec.bulk_channels},
                                           .security = bench_security(spec.tls)});
    if (!d) {
        emit(report_fd, Fields().set_str("error", "destination: " + d.error().message()));
        return 1;
    }
    const double listen_ms = double(now_ns() - l0) / 1e6;
    lazymig::Destination& dst = **d;

    // Overhead = RSS growth minus the guest RAM that should be resident at that moment:
    // memfd: the populated alias (until the pager unmaps it at completion) plus every
    // page continued into the guest view; anon: every page placed.
    const bool memfd = spec.backing != Backing::anon;
    std::atomic<std::int64_t> peak{std::numeric_limits<std::int64_t>::min()}, peak_anon{0};
    auto trace = PlotTrace::from_env(fmt::format("{}m-{}-{}touchers", spec.bytes >> 20, lazymig::to_string(spec.backing),
                                                 spec.touchers));  // scripts/bench --plot
    Sampler sampler([&] {
        const Rss r = read_rss();
        const lazymig::Stats st = dst.stats();
        if (trace) trace->sample(st);
        if (st.pages_present == st.total_pages) touchers.complete = true;
        const bool alias_mapped = memfd && st.phase != lazymig::Phase::completed;
        const std::int64_t expected = std::int64_t(st.pages_present * kPage + (alias_mapped ? spec.bytes : 0));
        max_into(peak, memory_growth(r0, r) - expected);
        max_into(peak_anon, std::int64_t(r.anon) - std::int64_t(r0.anon) - (memfd ? 0 : std::int64_t(st.pages_present * kPage)));
    });

    const auto uri = dst.local_uri();
    emit(report_fd, Fields().set_str("port", uri.substr(uri.rfind(':') + 1)).set("listen_ms", listen_ms));

    resumed_ns.wait(0);  // the source connects, hands over, and the session thread resumes us
    if (resumed_ns.load() != 1) touchers.go(resumed_ns.load());
    touchers.stop_and_join();
    const double touch_s = double(now_ns() - resumed_ns.load()) / 1e9;
    emit(report_fd, Fields().set_str("touch_done", "1").set("touch_seconds", touch_s));

    auto done = dst.wait();
    const std::uint64_t end_ns = now_ns();
    const lazymig::Stats st = dst.stats();
    const Rss r1 = read_rss();
    sampler.stop();
    if (trace) {
        std::vector<std::uint32_t> fault_ns;
        for (const auto& v : touchers.ns) fault_ns.insert(fault_ns.end(), v.begin(), v.end());
        trace->write(std::move(fault_ns));
    }

    Fields f;
    if (!done) f.set_str("error", "destination: " + done.error().message());
    const double postcopy_s = st.postcopy_ms / 1e3;
    f.set("dst_listen_ms", listen_ms)
        .set("dst_loaded_ns", loaded_ns.load())
        .set("dst_load_done_ns", load_done_ns.load())
        .set("dst_resumed_ns", resumed_ns.load())
        .set("dst_resume_done_ns", resume_done_ns.load())
        .set("dst_blocktime_ms", st.blocktime_ms)
        .set("dst_bulk_channels", std::uint64_t(st.bulk_channels))
        .set("dst_postcopy_ms", st.postcopy_ms)
        .set("dst_wall_ms", double(end_ns - resumed_ns.load()) / 1e6)
        .set("push_gbps", postcopy_s > 0 ? double(spec.bytes) / postcopy_s / 1e9 : 0.0)
        .set("push_pages_per_s", postcopy_s > 0 ? double(pages) / postcopy_s : 0.0)
        .set("dst_faults", st.faults)
        .set("dst_requests", st.requests)
        .set("dst_pages_demanded", st.pages_demanded)
        .set("dst_pages_pushed", st.pages_pushed)
        .set("dst_duplicate_pages", st.duplicate_pages)
        .set("dst_zero_pages", st.zero_pages)
        .set("dst_bytes_received", st.bytes_received)
        .set("dst_rss_growth_bytes", double(std::int64_t(r1.rss) - std::int64_t(r0.rss)))
        .set("dst_anon_growth_bytes", double(std::int64_t(r1.anon) - std::int64_t(r0.anon)))
        .set("dst_shmem_growth_bytes", double(std::int64_t(r1.shmem) - std::int64_t(r0.shmem)))
        .set("dst_file_growth_bytes", double(std::int64_t(r1.file) - std::int64_t(r0.file)))
        .set("dst_overhead_end_bytes", double(memory_growth(r0, r1) - std::int64_t(spec.bytes)))
        .set("dst_overhead_peak_bytes", double(std::max(peak.load(), memory_growth(r0, r1) - std::int64_t(spec.bytes))))
        .set("dst_anon_overhead_peak_bytes", double(peak_anon.load()))
        .set("dst_bound_bytes", destination_bound(spec.bytes, st.bulk_channels));
    f.merge(latency_fields("lib_fault", st.fault_latency));

    if (spec.touchers > 0) {
        std::vector<std::uint32_t> all;
        std::uint64_t skipped = 0, errors = 0, scans = 0;
        for (int t = 0; t < spec.touchers; ++t) {
            all.insert(all.end(), touchers.ns[t].begin(), touchers.ns[t].end());
            skipped += touchers.skipped[t];
            errors += touchers.errors[t];
            scans += touchers.scans[t];
        }
        f.merge(latency_fields("touch", summarize(all)));
        f.set("touch_skipped_present", skipped).set("touch_errors", errors).set("touch_scans", scans);
        f.set("touch_seconds", touch_s);
    }
    if (done) f.set("verify_errors", verify(mem->data(), pages));
    emit(report_fd, f);
    return done ? 0 : 1;
}

}  // namespace bench

namespace bench {

const std::vector<std::byte>& bench_key() {
    static const std::vector<std::byte> key = [] {
        std::vector<std::byte> k(32);
        std::random_device rd;
        for (auto& b : k) b = std::byte(rd() & 0xff);
        return k;
    }();
    return key;
}

lazymig::Security bench_security(bool tls) {
    if (!tls) return {.auth = lazymig::Auth::none};
    return {.auth = lazymig::Auth::psk, .psk = bench_key()};
}

Fields run_migration(Child& source, const MigrationRun& r) {
    DestinationSpec ds{.bytes = r.bytes, .backing = r.backing, .touchers = r.touchers, .max_samples = r.max_samples,
                       .max_seconds = 4, .bulk_channels = r.bulk_channels, .tls = r.tls};
    Child dst = Child::spawn([&](int c, int w) { return destination_run(ds, c, w); });
    auto port = dst.recv();
    if (!port || port->has("error"))
        return Fields().set_str("error", port ? port->str("error") : "destination ended: " + dst.finish());
    source.send(Fields()
                    .set_str("run", "1")
                    .set_str("port", port->str("port"))
                    .set("max_bandwidth", r.max_bandwidth)
                    .set("bulk_channels", std::uint64_t(r.bulk_channels))
                    .set("tls", std::uint64_t(r.tls)));
    auto touched = dst.recv();
    source.send(Fields().set_str("release", "1"));
    auto dres = dst.recv();
    auto sres = source.recv();
    const std::string how = dst.finish();
    Fields f;
    if (sres) f.merge(*sres);
    if (dres) f.merge(*dres);
    if (touched) f.set("touch_seconds", touched->num("touch_seconds"));
    f.set("dst_listen_ms", port->num("listen_ms"));
    std::string err;
    if (dres && dres->has("error")) err = dres->str("error");
    else if (!dres) err = "destination ended without a report (" + how + ")";
    if (sres && sres->has("error")) err += (err.empty() ? "" : "; ") + sres->str("error");
    else if (!sres) err += (err.empty() ? "" : "; ") + std::string("source server ended without a report");
    if (!err.empty()) f.set_str("error", err);
    return f;
}

}  // namespace bench
