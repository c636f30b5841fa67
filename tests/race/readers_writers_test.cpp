// A full migration with guest threads reading and writing random pages while pages
// arrive. Thread t writes only pages ≡ t (mod 4) and remembers what it wrote; at the end
// every byte of every page is the source's or the owner's last write.
#include <doctest/doctest.h>

#include <atomic>
#include <functional>
#include <random>
#include <unordered_map>

#include "tests/race/harness.hpp"

using namespace race;

namespace {

constexpr int kThreads = 4;
constexpr std::uint64_t kOpsBeforePush = 2'000;

struct Worker {
    int id = 0;
    std::unordered_map<std::uint64_t, std::uint64_t> wrote;  // page * kWords + word → value
    std::uint64_t ops = 0, writes = 0, checked = 0, ops_before_complete = 0;
    std::uint64_t wrong = 0, sigbus = 0;
    std::function<void()> on_warm;  // called once: after kOpsBeforePush operations, or at the end
    bool warmed = false;

    void warm() {
        if (!warmed && on_warm) on_warm();
        warmed = true;
    }

    [[nodiscard]] std::uint64_t expect(std::uint64_t page, std::uint64_t word) const {
        auto it = wrote.find(page * kWords + word);
        return it == wrote.end() ? content(page, word) : it->second;
    }

    void run(Pair& pair) {
        std::mt19937_64 rng(0x5eed0000u + static_cast<unsigned>(id));
        const std::uint64_t pages = pair.pages();
        std::vector<std::uint64_t> buf(kWords);
        bool complete = false;
        // Until every page is present and a while after; bounded whatever happens.
        for (; ops < 400'000 && (!complete || ops < ops_before_complete + 2'000); ++ops) {
            if (ops == kOpsBeforePush) warm();
            if (!complete && ops % 64 == 0 && pair.dst().stats().pages_present == pages) {
                complete = true;
                ops_before_complete = ops;
            }
            const std::uint64_t r = rng();
            std::uint64_t page = r % pages;
            if (r >> 62 == 0) {  // a write, to a page of our own
                page = page - page % kThreads + static_cast<std::uint64_t>(id);
                if (page >= pages) page -= kThreads;
                const std::uint64_t word = (r >> 20) % kWords, value = rng();
                if (!guarded_write(pair.dst_page(page) + word, value)) {
                    ++sigbus;
                    return;
                }
                wrote[page * kWords + word] = value;
                ++writes;
                continue;
            }
            if (!guarded_read(buf.data(), pair.dst_page(page), kPage)) {
                ++sigbus;
                return;
            }
            if (page % kThreads != static_cast<std::uint64_t>(id)) continue;  // others write there
            ++checked;
            for (std::uint64_t w = 0; w < kWords; ++w) wrong += buf[w] != expect(page, w);
        }
        if (!complete) ops_before_complete = ops;
    }
};

}  // namespace

TEST_CASE("race/readers-and-writers-while-pages-arrive") {
    SigbusGuard guard;
    // The pusher is held (failpoint) until every thread has done kOpsBeforePush
    // operations on pages that can only come by demand; then both race to the end.
    Pair pair(pick_backing(), 32u << 20);
    PusherHold hold;
    std::vector<Worker> workers(kThreads);
    Threads threads([&] { pair.cancel(); });
    std::atomic<int> warmed{0};
    for (int t = 0; t < kThreads; ++t) {
        workers[t].id = t;
        workers[t].on_warm = [&] {
            if (++warmed == kThreads) hold.release();
        };
        threads.spawn([&pair, &w = workers[t]] {
            w.run(pair);
            w.warm();  // a thread that stopped early must not keep the pusher held
        });
    }
    pair.migrate();
    REQUIRE_MESSAGE(threads.wait_all(), "guest threads did not finish");
    const auto end = pair.finish();
    CHECK(warmed == kThreads);
    CHECK_FALSE(hold.timed_out());
    pair.check_clean_end(end);

    std::uint64_t before = 0;
    for (const auto& w : workers) {
        CAPTURE(w.id);
        CHECK(w.sigbus == 0);
        CHECK(w.wrong == 0);
        CHECK(w.writes > 0);
        CHECK(w.checked > 0);
        before += w.ops_before_complete;
    }
    const auto s = pair.dst().stats();
    MESSAGE("faults ", s.faults, ", requests ", s.requests, ", demanded ", s.pages_demanded, ", pushed ",
            s.pages_pushed, ", duplicates ", s.duplicate_pages, ", guest ops before complete ", before);
    CHECK(s.faults > 0);  // the threads did touch pages that had not arrived
    CHECK(before > 0);

    // Every byte of every page: the source's, or the owning thread's last write.
    std::vector<std::uint64_t> got(kWords);
    std::uint64_t bad_pages = 0;
    for (std::uint64_t p = 0; p < pair.pages(); ++p) {
        const Worker& owner = workers[p % kThreads];
        bool ok = guarded_read(got.data(), pair.dst_page(p), kPage);
        for (std::uint64_t w = 0; w < kWords; ++w) ok &= got[w] == owner.expect(p, w);
        bad_pages += !ok;
    }
    CHECK(bad_pages == 0);
}
