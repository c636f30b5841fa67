// source/dirty-tracker/*: writer threads write pages of guest memory while the test
// thread collects the dirty set round after round. Every write is reported by a collect
// that ran after it began and no later than the first one that began after it completed;
// pages no writer touches are never reported.
#include <doctest/doctest.h>

#include <atomic>
#include <bit>
#include <fstream>
#include <random>
#include <thread>

#include "precopy/dirty_tracker.hpp"
#include "util.hpp"

using namespace lazymig;
using namespace lazymig::source;
using source_test::err_of;
using source_test::TestMemory;

namespace {

std::string_view method_name(DirtyTracking t) {
    switch (t) {
    case DirtyTracking::wp_async: return "wp-async";
    case DirtyTracking::wp_sync: return "wp-sync";
    case DirtyTracking::vmm: return "vmm";
    default: return "?";
    }
}

constexpr int kRounds = 24;
constexpr int kWriters = 2;

// A bit per page, set by any thread.
struct AtomicBits {
    explicit AtomicBits(std::size_t pages) : words((pages + 63) / 64) {}
    void set(std::uint64_t p) { words[p / 64].fetch_or(1ull << (p % 64), std::memory_order_acq_rel); }
    [[nodiscard]] bool test(std::uint64_t p) const { return words[p / 64].load(std::memory_order_acquire) >> (p % 64) & 1; }
    std::vector<std::atomic<std::uint64_t>> words;
};

// The VMM-supplied log used in tests: a writer sets a page's bit after writing it, as a
// VMM marks pages its device models write; the tracker takes and clears the bits.
struct SoftwareLog {
    explicit SoftwareLog(std::size_t pages) : bits(pages) {}
    DirtyLogFn fn() {
        return [this](std::uint32_t region, std::span<std::uint64_t> out) -> Result<void> {
            if (region != 0) return logic_error("software log: one region only");
            ++calls;
            for (std::size_t i = 0; i < out.size(); ++i) out[i] |= bits.words[i].exchange(0, std::memory_order_acq_rel);
            return {};
        };
    }
    AtomicBits bits;
    int calls = 0;
};

// Writes into the first half of the region only; the second half must stay clean.
void exercise(const GuestRegion& g, DirtyTracking method, SoftwareLog* log = nullptr) {
    const std::uint64_t pages = g.size / g.page_size;
    const std::uint64_t written_pages = pages / 2;
    auto made = make_dirty_tracker(std::span(&g, 1), method, log ? log->fn() : DirtyLogFn{});
    REQUIRE_MESSAGE(made.has_value(), err_of(made));
    auto& tracker = **made;
    CHECK(tracker.method() == method);
    REQUIRE_MESSAGE(tracker.start().has_value(), "start");

    // Each write is recorded with the epoch read before it began and the epoch read after
    // it completed; epoch e starts when collect e returned (collect 0: start()). A writer
    // writes at most kBudget pages per epoch, so the record stays bounded.
    struct Write {
        std::uint64_t page;
        int begun, ended;
    };
    constexpr int kBudget = 256;
    std::vector<std::vector<Write>> records(kWriters);
    std::atomic<int> epoch{0};
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> writes{0};
    std::vector<std::thread> writers;
    for (int w = 0; w < kWriters; ++w) {
        records[w].reserve(std::size_t(kBudget) * (kRounds + 1));
        writers.emplace_back([&, w] {
            std::mt19937_64 rng(w + 1);
            int budget_epoch = -1, budget = 0;
            while (!stop.load(std::memory_order_acquire)) {
                const int e = epoch.load(std::memory_order_acquire);
                if (e != budget_epoch) {
                    budget_epoch = e;
                    budget = kBudget;
                }
                if (budget == 0) {
                    std::this_thread::yield();
                    continue;
                }
                --budget;
                const std::uint64_t p = rng() % written_pages;
                auto* word = reinterpret_cast<volatile std::uint64_t*>(static_cast<std::byte*>(g.host) + p * g.page_size +
                                                                        (rng() % (g.page_size / 8)) * 8);
                *word = *word + 1;
                if (log) log->bits.set(p);
                records[w].push_back({p, e, epoch.load(std::memory_order_acquire)});
                writes.fetch_add(1, std::memory_order_relaxed);
            }
        });
    }
    std::vector<DirtySet> got;
    // Writes counted before an epoch began; every writer then has kBudget writes of the
    // new epoch to make, so base + 64 is always reached.
    std::uint64_t base = 0;
    for (int round = 0; round < kRounds; ++round) {
        // Let writes happen: wait for a few of them (a deadline only to fail, not to pace).
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (writes.load() < base + 64) {
            REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline, "writers made no progress for 60 s");
            std::this_thread::yield();
        }
        got.emplace_back(std::span(&g, 1));
        auto c = tracker.collect(got.back());
        REQUIRE_MESSAGE(c.has_value(), err_of(c));
        base = writes.load();
        epoch.store(round + 1, std::memory_order_release);
    }
    stop = true;
    for (auto& t : writers) t.join();
    got.emplace_back(std::span(&g, 1));  // the last: every write has completed
    REQUIRE(tracker.collect(got.back()).has_value());
    got.emplace_back(std::span(&g, 1));
    REQUIRE(tracker.collect(got.back()).has_value());
    tracker.stop();

    std::uint64_t missed = 0, checked = 0, clean_reported = 0, reported = 0;
    // A write that began in epoch b (collect b had returned) and had completed when epoch
    // n was read (before collect n+2 began) is reported in one of got[b] .. got[n+1].
    for (const auto& rec : records) {
        for (const auto& wr : rec) {
            ++checked;
            bool seen = false;
            for (int k = wr.begun; k <= wr.ended + 1 && k < int(got.size()); ++k) seen = seen || got[k].test(0, wr.page);
            if (!seen) ++missed;
        }
    }
    for (std::size_t k = 0; k < got.size(); ++k) {
        reported += got[k].count();
        for (std::uint64_t p = written_pages; p < pages; ++p) clean_reported += got[k].test(0, p);
    }
    MESSAGE(method_name(method) << " " << (g.backing == Backing::anon ? "anon" : "file") << ": " << writes.load() << " writes, " << checked
                              << " writes checked, " << reported << " pages reported");
    CHECK(checked > 0);
    CHECK(missed == 0);
    CHECK(clean_reported == 0);
    CHECK(got.back().count() == 0);  // nothing written after the writers stopped
    if (log) CHECK(log->calls == kRounds + 3);
}

}  // namespace

TEST_CASE("source/dirty-tracker/wp-async") {
    for (auto b : {Backing::anon, Backing::memfd}) {
        auto mem = TestMemory::create("ram0", 1024 * 4096, b);
        REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
        exercise(mem->region(), DirtyTracking::wp_async);
    }
}

TEST_CASE("source/dirty-tracker/wp-sync") {
    for (auto b : {Backing::anon, Backing::memfd}) {
        auto mem = TestMemory::create("ram0", 1024 * 4096, b);
        REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
        exercise(mem->region(), DirtyTracking::wp_sync);
    }
}

TEST_CASE("source/dirty-tracker/vmm-log") {
    auto mem = TestMemory::create("ram0", 1024 * 4096, Backing::anon);
    REQUIRE_MESSAGE(mem.has_value(), err_of(mem));
    SoftwareLog log(1024);
    exercise(mem->region(), DirtyTracking::vmm, &log);
}

// Pages never written are not reported, unpopulated anonymous pages included (the
// write-protect reaches them through WP_UNPOPULATED): the first write to one is seen.
TEST_CASE("source/dirty-tracker/unpopulated") {
    for (auto method : {DirtyTracking::wp_async, DirtyTracking::wp_sync}) {
        const std::size_t size = 256 * 4096;
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        REQUIRE(p != MAP_FAILED);
        const GuestRegion g{.name = "ram0", .host = p, .size = size, .page_size = 4096, .backing = Backing::anon};
        auto t = make_dirty_tracker(std::span(&g, 1), method, {});
        REQUIRE_MESSAGE(t.has_value(), err_of(t));
        REQUIRE((*t)->start().has_value());
        DirtySet d(std::span(&g, 1));
        REQUIRE((*t)->collect(d).has_value());
        CHECK(d.count() == 0);
        std::thread([&] { static_cast<volatile char*>(p)[7 * 4096 + 5] = 1; }).join();
        static_cast<volatile char*>(p)[200 * 4096] = 2;
        REQUIRE((*t)->collect(d).has_value());
        CHECK(d.count() == 2);
        CHECK(d.test(0, 7));
        CHECK(d.test(0, 200));
        (*t)->stop();
        ::munmap(p, size);
    }
}

// Registered as its own meson test: exits 77 (skip) when no huge pages can be had.
TEST_CASE("source/dirty-tracker-hugetlbfs") {
    source_test::HugeTestMemory mem("huge0", 8 << 20, 8);
    for (auto method : {DirtyTracking::wp_async, DirtyTracking::wp_sync}) exercise(mem->region(), method);
}
