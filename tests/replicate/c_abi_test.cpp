// The C ABI of back-replication: a hybrid migration of a checkable guest through
// lazymig.h, with output commit through on_committed and the epoch figures read back.
#include <doctest/doctest.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "lazymig/lazymig.h"
#include "tests/replicate/guest.hpp"

namespace {

using namespace std::chrono_literals;
using race::err_of;
using replicate::kPage;

// One side's hooks: its guest, and (destination) the epochs committed, in order.
struct Side {
    replicate::Guest* guest = nullptr;
    std::mutex mu;
    std::vector<std::uint64_t> commits;
    lazymig::test::Flag two_commits;
};

void pause(void* c) { static_cast<Side*>(c)->guest->pause(); }
void resume(void* c) { static_cast<Side*>(c)->guest->resume(); }
int save(void* c, void** buf, size_t* len) {
    const auto state = static_cast<Side*>(c)->guest->state();
    *buf = std::malloc(state.size());
    if (!*buf) return -ENOMEM;
    std::memcpy(*buf, state.data(), state.size());
    *len = state.size();
    return 0;
}
int load(void* c, const void* buf, size_t len) {
    static_cast<Side*>(c)->guest->set_count(
        replicate::Guest::count_of(std::span(static_cast<const std::byte*>(buf), len)));
    return 0;
}
void committed(void* c, std::uint64_t n) {
    auto* s = static_cast<Side*>(c);
    std::lock_guard lock(s->mu);
    s->commits.push_back(n);
    if (s->commits.size() >= 2) s->two_commits.set();
}

lazymig_region c_region(const lazymig::GuestRegion& r) {
    return {"ram0", r.host, r.size, r.page_size, static_cast<int>(r.backing), r.fd, r.fd_offset};
}

}  // namespace

TEST_CASE("replicate/c-abi-hybrid-commits-epochs-and-releases-output") {
    constexpr std::size_t kPages = 1024, kCold = 2048;
    auto sm = lazymig::GuestMemory::create("ram0", (kPages + kCold) * kPage, lazymig::Backing::memfd, true);
    REQUIRE_MESSAGE(sm.has_value(), err_of(sm));
    auto dm = lazymig::GuestMemory::create("ram0", (kPages + kCold) * kPage, lazymig::Backing::memfd, false);
    REQUIRE_MESSAGE(dm.has_value(), err_of(dm));
    replicate::Guest sguest(sm->data(), kPages, kCold), dguest(dm->data(), kPages);
    Side s{.guest = &sguest}, d{.guest = &dguest};
    const lazymig_hooks sh{&s, pause, resume, save, load, nullptr};
    const lazymig_hooks dh{&d, pause, resume, save, load, nullptr};
    const lazymig_region sr = c_region(sm->region()), dr = c_region(dm->region());
    race::PusherHold push;  // post-copy lasts until released: epochs come meanwhile

    lazymig_destination* dst = nullptr;
    REQUIRE_MESSAGE(lazymig_destination_listen_hybrid(&dr, 1, &dh, "tcp:127.0.0.1:0", "none", 0, 0, 20, 2000, committed,
                                                      &dst) == 0,
                    lazymig_last_error());
    char uri[64];
    REQUIRE(lazymig_destination_local_uri(dst, uri, sizeof uri) == 0);
    lazymig_source* src = nullptr;
    REQUIRE_MESSAGE(lazymig_source_create_auth(&sr, 1, &sh, uri, LAZYMIG_MODE_HYBRID, "none", &src) == 0,
                    lazymig_last_error());
    REQUIRE(lazymig_source_set_replication(src, 20, 2000) == 0);
    lazymig_precopy_params pp{};
    REQUIRE(lazymig_source_get_precopy(src, &pp) == 0);
    pp.max_rounds = 1;
    REQUIRE(lazymig_source_set_precopy(src, &pp) == 0);
    CHECK(lazymig_destination_open_epoch(dst) == 0);  // not replicating yet

    sguest.start();
    dguest.start();
    sguest.resume();
    REQUIRE(lazymig_source_migrate(src) == 0);
    REQUIRE_MESSAGE(d.two_commits.wait_for(60s), "two epochs were not committed in time");
    const std::uint64_t open = lazymig_destination_open_epoch(dst);
    CHECK(open >= 3);
    lazymig_replication_stats mid{};
    REQUIRE(lazymig_source_replication_stats(src, &mid) == 0);
    CHECK(mid.epochs >= 2);  // applied at the source before their acks went out

    push.release();
    CHECK_MESSAGE(lazymig_destination_wait(dst) == 0, lazymig_last_error());
    CHECK_MESSAGE(lazymig_source_wait(src) == 0, lazymig_last_error());
    lazymig_replication_stats ds{}, ss{};
    REQUIRE(lazymig_destination_replication_stats(dst, &ds) == 0);
    REQUIRE(lazymig_source_replication_stats(src, &ss) == 0);
    CHECK(ds.epochs >= 2);
    CHECK(ds.epochs_committed >= 2);
    CHECK(ds.epoch_pages > 0);
    CHECK(ds.pause_max_us >= ds.pause_p50_us);
    CHECK(ds.pause_p50_us > 0);
    CHECK(ds.commit_p50_us > 0);
    CHECK(ds.fenced == 0);
    CHECK(ss.resumed_on_source == 0);
    CHECK(ss.epochs >= 2);
    {
        std::lock_guard lock(d.mu);
        for (std::size_t i = 1; i < d.commits.size(); ++i) CHECK(d.commits[i] > d.commits[i - 1]);
        CHECK(d.commits.back() == lazymig_destination_open_epoch(dst));  // RELEASE let everything out
    }
    dguest.pause();
    CHECK(replicate::Guest::inconsistent_slots(dm->data(), kPages, dguest.count()) == 0);
    lazymig_source_destroy(src);
    lazymig_destination_destroy(dst);
    sguest.stop();
    dguest.stop();
}
