// lazymig-peer — one side of a two-process migration test, with a checking workload.
//
//   lazymig-peer dest   --size MiB --backing B --seed S --workers N [--recover-timeout-ms MS]
//   lazymig-peer source --size MiB --backing B --seed S --uri tcp:H:P [--max-bandwidth B/s]
//   both: --psk-file FILE (the migration's key) or --auth none
//
// Guest content is a function of (seed, 4 KiB unit, word); every 13th unit is zero so the
// zero-page path runs. On the destination, N workers start when the VM resumes and
// read and write random units while pages arrive: worker t writes word 0 of units
// ≡ t (mod N) and remembers what it wrote; reads check a random word other than word 0
// of any unit. After the migration every byte is checked. A read that finds zeroes
// where data belongs is reported as ZERO-FILL; SIGBUS on a poisoned page stops a worker.
//
// Output lines (stdout): "uri tcp:...", "resumed", "verified ...", "error: ...".
// Exit: 0 all good, 2 bad usage, 3 migration failed, 4 content wrong.
#include <setjmp.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "lazymig/lazymig.hpp"

using namespace lazymig;

std::string fmt_stats(const lazymig::Stats& s);
namespace {

constexpr std::size_t kUnit = 4096, kWords = kUnit / 8;

std::uint64_t mix(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
std::uint64_t content(std::uint64_t seed, std::uint64_t unit, std::uint64_t word) {
    if (unit % 13 == 5) return 0;
    return mix(seed ^ (unit << 9 | word)) | 1;
}

struct Options {
    std::string role, uri = "tcp:127.0.0.1:0";
    std::size_t size_mib = 64;
    Backing backing = Backing::anon;
    std::uint64_t seed = 1, max_bandwidth = 0;
    unsigned workers = 4;
    unsigned recover_timeout_ms = 60'000;  // --recover-timeout-ms (dest): a lost source pauses first
    unsigned bulk_channels = 1;
    Security security{};  // --psk-file FILE, or --auth none
};

bool parse(int argc, char** argv, Options& o) {
    if (argc < 2) return false;
    o.role = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        std::string k = argv[i], v = argv[i + 1];
        if (k == "--size") o.size_mib = std::stoull(v);
        else if (k == "--backing") {
            auto b = parse_backing(v);
            if (!b) return false;
            o.backing = *b;
        } else if (k == "--seed") o.seed = std::stoull(v);
        else if (k == "--uri") o.uri = v;
        else if (k == "--workers") o.workers = static_cast<unsigned>(std::stoul(v));
        else if (k == "--recover-timeout-ms") o.recover_timeout_ms = static_cast<unsigned>(std::stoul(v));
        else if (k == "--max-bandwidth") o.max_bandwidth = std::stoull(v);
        else if (k == "--bulk-channels") o.bulk_channels = static_cast<unsigned>(std::stoul(v));
        else if (k == "--psk-file") o.security = {.auth = Auth::psk, .psk_file = v};
        else if (k == "--auth" && v == "none") o.security = {.auth = Auth::none};
        else return false;
    }
    return o.role == "dest" || o.role == "source";
}

void say(const std::string& line) {
    std::fputs((line + "\n").c_str(), stdout);
    std::fflush(stdout);
}

// ─── destination workers ──────────────────────────────────────────────────────────
thread_local sigjmp_buf* t_jump = nullptr;
std::atomic<std::uint64_t> g_sigbus{0};

void on_sigbus(int) {
    g_sigbus.fetch_add(1);
    if (t_jump) siglongjmp(*t_jump, 1);
    std::_Exit(5);  // SIGBUS outside a worker: fail loudly
}

struct Shared {
    const Options* o;
    std::uint64_t* ram;
    std::size_t units;
    std::mutex mu;
    std::condition_variable cv;
    bool running = false;
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> reads{0}, writes{0}, bad{0}, zero_fill{0};
    std::vector<std::vector<std::uint64_t>> written;  // [worker][unit / workers] = value, 0 = none
};

void worker(Shared& s, unsigned t) {
    {
        std::unique_lock lock(s.mu);
        s.cv.wait(lock, [&] { return s.running || s.stop.load(); });
    }
    sigjmp_buf jump;
    t_jump = &jump;
    if (sigsetjmp(jump, 1) != 0) {  // a poisoned page: this vCPU is done
        t_jump = nullptr;
        return;
    }
    const unsigned n = s.o->workers;
    std::uint64_t x = mix(s.o->seed + t + 1);
    for (std::uint64_t op = 0; op < 200'000 && !s.stop.load(std::memory_order_relaxed); ++op) {
        x = mix(x);
        const std::uint64_t unit = x % s.units;
        volatile std::uint64_t* w = s.ram + unit * kWords;
        if (unit % n == t && (x >> 40) % 4 == 0) {
            const std::uint64_t value = mix(x ^ 0xabcdef) | 1;
            w[0] = value;
            s.written[t][unit / n] = value;
            s.writes.fetch_add(1, std::memory_order_relaxed);
        } else {
            const std::uint64_t word = 1 + (x >> 20) % (kWords - 1);
            const std::uint64_t got = w[word], want = content(s.o->seed, unit, word);
            s.reads.fetch_add(1, std::memory_order_relaxed);
            if (got != want) {
                s.bad.fetch_add(1);
                if (got == 0) s.zero_fill.fetch_add(1);
            }
        }
    }
    t_jump = nullptr;
}

int run_dest(const Options& o) {
    const std::size_t size = o.size_mib << 20;
    auto mem = GuestMemory::create("ram0", size, o.backing, false);
    if (!mem) return say("error: " + mem.error().message()), 3;
    Shared s;
    s.o = &o;
    s.ram = reinterpret_cast<std::uint64_t*>(mem->data());
    s.units = size / kUnit;
    s.written.assign(o.workers, std::vector<std::uint64_t>(s.units / std::max(o.workers, 1u) + 1, 0));
    struct sigaction sa {};
    sa.sa_handler = on_sigbus;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, nullptr);

    std::vector<std::thread> threads;
    for (unsigned t = 0; t < o.workers; ++t) threads.emplace_back(worker, std::ref(s), t);
    auto release = [&](bool run) {
        std::lock_guard lock(s.mu);
        s.running = run;
        if (!run) s.stop = true;
        s.cv.notify_all();
    };
    VmmHooks hooks{
        .pause_vcpus = [&] { s.stop = true; },  // workers blocked on a page end by SIGBUS
        .resume_vcpus = [&] { say("resumed"); release(true); },
        .save_device_state = {},
        .load_device_state = [&](std::span<const std::byte> b) -> Result<void> {
            if (b.size() != 8) return logic_error("device state is not 8 bytes");
            return {};
        },
    };
    auto dst = Destination::listen({.regions = {mem->region()}, .hooks = hooks, .uri = o.uri,
                                    .parameters = {.recover_timeout = std::chrono::milliseconds(o.recover_timeout_ms)},
                                    .security = o.security});
    if (!dst) {
        release(false);
        for (auto& t : threads) t.join();
        return say("error: " + dst.error().message()), 3;
    }
    say("uri " + (*dst)->local_uri());
    auto r = (*dst)->wait();
    const auto st = (*dst)->stats();
    release(false);
    if (!r && r.error().message().find("stay blocked") != std::string::npos) {
        // A kernel without userfaultfd POISON (e.g. 6.1) leaves workers blocked on pages
        // that will never come: report and leave without joining them.
        say(fmt_stats(st));
        say("error: " + r.error().message());
        std::fflush(stdout);
        std::_Exit(s.zero_fill ? 4 : 3);
    }
    for (auto& t : threads) t.join();
    say(fmt_stats(st));
    if (s.zero_fill) say("ZERO-FILL: " + std::to_string(s.zero_fill.load()) + " reads found zeroes");
    if (!r) {
        say("error: " + r.error().message());
        say("sigbus " + std::to_string(g_sigbus.load()));
        return s.zero_fill ? 4 : 3;
    }
    // Every byte of every unit.
    std::uint64_t wrong = 0, written = 0;
    for (std::size_t u = 0; u < s.units; ++u) {
        const std::uint64_t* w = s.ram + u * kWords;
        const std::uint64_t mine = o.workers ? s.written[u % o.workers][u / o.workers] : 0;  // 0: no workers
        written += mine != 0;
        if (w[0] != (mine ? mine : content(o.seed, u, 0))) ++wrong;
        for (std::size_t k = 1; k < kWords; ++k)
            if (w[k] != content(o.seed, u, k)) {
                ++wrong;
                break;
            }
    }
    say("verified units=" + std::to_string(s.units) + " written=" + std::to_string(written) +
        " reads=" + std::to_string(s.reads.load()) + " bad_reads=" + std::to_string(s.bad.load()) +
        " wrong_units=" + std::to_string(wrong));
    return wrong || s.bad ? 4 : 0;
}

int run_source(const Options& o) {
    const std::size_t size = o.size_mib << 20;
    auto mem = GuestMemory::create("ram0", size, o.backing, true);
    if (!mem) return say("error: " + mem.error().message()), 3;
    auto* ram = reinterpret_cast<std::uint64_t*>(mem->data());
    for (std::size_t u = 0; u < size / kUnit; ++u)
        for (std::size_t k = 0; k < kWords; ++k) ram[u * kWords + k] = content(o.seed, u, k);
    VmmHooks hooks{
        .pause_vcpus = [] {},
        .resume_vcpus = [] {},
        .save_device_state = []() -> Result<std::vector<std::byte>> { return std::vector<std::byte>(8); },
    };
    Parameters p;
    p.max_bandwidth = o.max_bandwidth;
    p.bulk_channels = o.bulk_channels;
    auto src = Source::create({.regions = {mem->region()}, .hooks = hooks, .uri = o.uri, .parameters = p,
                               .security = o.security});
    if (!src) return say("error: " + src.error().message()), 3;
    if (auto m = (*src)->migrate(); !m) return say("error: " + m.error().message()), 3;
    auto r = (*src)->wait();
    say(fmt_stats((*src)->stats()));
    if (!r) return say("error: " + r.error().message()), 3;
    say("source done");
    return 0;
}

}  // namespace

std::string fmt_stats(const Stats& s) {
    return "stats phase=" + std::string(to_string(s.phase)) + " present=" + std::to_string(s.pages_present) +
           "/" + std::to_string(s.total_pages) + " pushed=" + std::to_string(s.pages_pushed) +
           " demanded=" + std::to_string(s.pages_demanded) + " zero=" + std::to_string(s.zero_pages) +
           " duplicates=" + std::to_string(s.duplicate_pages) + " faults=" + std::to_string(s.faults) +
           " missing=" + std::to_string(s.pages_missing) + " resumed=" + std::to_string(s.destination_resumed) +
           " downtime_ms=" + std::to_string(s.downtime_ms) + " bulk=" + std::to_string(s.bulk_channels) +
           " fault_max_ms=" + std::to_string(static_cast<std::uint64_t>(s.fault_latency.max_us / 1000)) +
           " fault_p50_us=" + std::to_string(static_cast<std::uint64_t>(s.fault_latency.p50_us)) +
           " fault_p99_us=" + std::to_string(static_cast<std::uint64_t>(s.fault_latency.p99_us)) +
           " postcopy_ms=" + std::to_string(static_cast<std::uint64_t>(s.postcopy_ms));
}

int main(int argc, char** argv) {
    Options o;
    try {
        if (!parse(argc, argv, o)) {
            std::fprintf(stderr, "usage: lazymig-peer dest|source --size MiB --backing anon|memfd|hugetlbfs "
                                 "--seed N [--uri tcp:H:P] [--workers N] [--max-bandwidth B]\n");
            return 2;
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lazymig-peer: bad number: %s\n", e.what());
        return 2;
    }
    return o.role == "dest" ? run_dest(o) : run_source(o);
}
