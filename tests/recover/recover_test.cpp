// Post-copy link loss, pause and recover, against a real Source and Destination over
// TLS on loopback (tests/race/harness.hpp). Interleavings come from fail points: the
// pusher is held (PushGate) so that what is in flight, what the destination lacks and
// what a guest thread waits on are the same on every machine. Phases are read through
// stats() with a deadline (a failure detector, never an ordering).
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "src/net/socket.hpp"
#include "src/protocol.hpp"
#include "tests/race/harness.hpp"

using namespace race;
using namespace std::chrono_literals;
using lazymig::Phase;

namespace {

bool both_in(Pair& pair, Phase p) {
    return eventually([&] { return pair.src().stats().phase == p && pair.dst().stats().phase == p; });
}

// Holds the source's pusher at a batch while closed: from its `from`-th batch (counted
// over every pusher of the migration) until open(). Reclosing holds the next batch
// again (a new link's pusher). Declared after the Pair: destroyed first, it lets a held
// pusher go before the endpoints join it.
class PushGate {
public:
    explicit PushGate(int from = 1) : s_(std::make_shared<State>()) {
        s_->from = from;
        lazymig::failpoint::arm("source_push_batch", [s = s_](const lazymig::failpoint::Site&) {
            std::unique_lock lock(s->mu);
            if (++s->hits < s->from || !s->closed) return 0;
            ++s->held;
            s->cv.notify_all();
            s->cv.wait_for(lock, kLimit, [&] { return !s->closed; });
            return std::exchange(s->fail_held, 0);
        });
    }
    ~PushGate() {
        open();
        lazymig::failpoint::disarm_all();
    }
    PushGate(const PushGate&) = delete;
    PushGate& operator=(const PushGate&) = delete;

    void open() {
        std::lock_guard lock(s_->mu);
        s_->closed = false;
        s_->cv.notify_all();
    }
    // Opens, and the batch held now fails (ECONNABORTED) instead of going out: its pages,
    // marked sent, never reach the destination — lost in flight, whatever the timing.
    // For a source that paused already (the failure, class local, would end a live link).
    void drop_held() {
        std::lock_guard lock(s_->mu);
        s_->fail_held = ECONNABORTED;
        s_->closed = false;
        s_->cv.notify_all();
    }
    void close() {
        std::lock_guard lock(s_->mu);
        s_->closed = true;
    }
    // True once a pusher is held for the n-th time.
    [[nodiscard]] bool wait_held(int n = 1) {
        std::unique_lock lock(s_->mu);
        return s_->cv.wait_for(lock, kLimit, [&] { return s_->held >= n; });
    }

private:
    struct State {
        std::mutex mu;
        std::condition_variable cv;
        int hits = 0, held = 0, from = 1, fail_held = 0;
        bool closed = true;
    };
    std::shared_ptr<State> s_;
};

// A guest read of page `p` on the destination: true if it read the source's bytes.
bool reads_source_page(Pair& pair, std::uint64_t p) {
    std::vector<std::uint64_t> got(kWords), want(kWords);
    expected_page(p, want.data());
    return guarded_read(got.data(), pair.dst_page(p), kPage) && std::memcmp(got.data(), want.data(), kPage) == 0;
}

// The phases from the first postcopy on.
std::vector<Phase> from_postcopy(const std::vector<Phase>& all) {
    auto it = std::find(all.begin(), all.end(), Phase::postcopy);
    return {it, all.end()};
}

std::string names(const std::vector<Phase>& ps) {
    std::string out;
    for (auto p : ps) out += fmt::format("{} ", lazymig::to_string(p));
    return out;
}

}  // namespace

TEST_CASE("recover/pause-mid-transfer-then-recover-on-a-new-port") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 16u << 20, {}, {.recover_timeout = 30s, .bulk_channels = 1});
    PushGate gate(3);  // two batches pushed, the third held
    // Before post-copy there is nothing to pause.
    auto early = pair.src().pause();
    REQUIRE_FALSE(early.has_value());
    CHECK(early.error().message() == "source: pause() during idle: only a post-copy can pause (before it the VM runs "
                                     "here and cancel() keeps it here; after it there is nothing to pause)");
    pair.migrate();
    REQUIRE(gate.wait_held());
    REQUIRE(pair.src().stats().phase == Phase::postcopy);
    auto p = pair.src().pause();
    REQUIRE_MESSAGE(p.has_value(), err_of(p));
    gate.drop_held();  // the held batch is lost in flight
    REQUIRE(both_in(pair, Phase::paused));
    const auto old_port = port_of(pair.dst().local_uri());
    auto again = pair.dst().pause();
    REQUIRE_FALSE(again.has_value());
    CHECK(again.error().message().starts_with("destination: pause() during paused:"));

    // A guest thread faults while the link is down: its page stays REQUESTED, nothing is
    // sent, and it is asked for again after the recover — the only way it can come,
    // since the next pusher is held at its first batch.
    const std::uint64_t page = pair.pages() - 3;
    const auto faults = pair.dst().stats().faults;
    std::atomic<bool> read_ok{false};
    Threads guest([&] { pair.cancel(); });
    guest.spawn([&] { read_ok = reads_source_page(pair, page); });
    REQUIRE(eventually([&] { return pair.dst().stats().faults > faults; }));
    CHECK(pair.dst().stats().phase == Phase::paused);
    gate.close();

    auto d = pair.dst().recover("tcp:127.0.0.1:0");
    REQUIRE_MESSAGE(d.has_value(), err_of(d));
    const std::string uri = pair.dst().local_uri();
    CHECK(port_of(uri) != old_port);
    auto s = pair.src().recover(uri);
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    REQUIRE(gate.wait_held(2));  // the new link's pusher, held
    REQUIRE(guest.wait_all(30s));
    CHECK(read_ok);
    gate.open();

    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
    const auto ss = pair.src().stats();
    const auto ds = pair.dst().stats();
    CHECK(ss.pages_lost_in_flight > 0);  // the held batch: sent map reset to what was lacking
    CHECK(ss.pages_present == pair.pages());
    CHECK(ss.pauses == 1);
    CHECK(ss.recoveries == 1);
    CHECK(ds.pauses == 1);
    CHECK(ds.recoveries == 1);
    const std::vector<Phase> want{Phase::postcopy, Phase::paused, Phase::recovering, Phase::postcopy,
                                  Phase::completed};
    CHECK_MESSAGE(from_postcopy(pair.counts().phases(false)) == want, names(pair.counts().phases(false)));
    CHECK_MESSAGE(from_postcopy(pair.counts().phases(true)) == want, names(pair.counts().phases(true)));
}

// Hybrid: the guest writes 1024 pages at the source during the first pre-copy round
// (played from the fail point at its first batch), so they are stale at switchover and
// post-copy fetches them; that post-copy is paused and recovered. Back-replication off
// (epoch_ms 0): with it on, a lost link fails over to the source instead (tests/replicate).
TEST_CASE("recover/hybrid-pause-then-recover") {
    SigbusGuard guard;
    Pair pair(Backing::memfd, 8u << 20, {},
              {.recover_timeout = 30s, .bulk_channels = 1, .mode = lazymig::Mode::hybrid, .epoch_ms = 0});
    PushGate gate(2);
    auto wrote = std::make_shared<std::atomic<bool>>(false);
    lazymig::failpoint::arm("source_precopy_batch", [&pair, wrote](const lazymig::failpoint::Site&) {
        if (!wrote->exchange(true))
            for (std::uint64_t p = 1000; p < 2024; ++p) pair.src_page(p)[7] = 0xfeedull + p;
        return 0;
    });
    pair.migrate();
    REQUIRE(gate.wait_held());
    REQUIRE(pair.src().pause().has_value());
    gate.drop_held();
    REQUIRE(both_in(pair, Phase::paused));
    CHECK(pair.dst().stats().pages_present < pair.pages());
    REQUIRE(pair.dst().recover("tcp:127.0.0.1:0").has_value());
    REQUIRE(pair.src().recover(pair.dst().local_uri()).has_value());
    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
    CHECK(pair.src().stats().pages_lost_in_flight > 0);
    const auto phases = pair.counts().phases(false);
    CHECK_MESSAGE(std::find(phases.begin(), phases.end(), Phase::precopy) != phases.end(), names(phases));
    const std::vector<Phase> want{Phase::postcopy, Phase::paused, Phase::recovering, Phase::postcopy,
                                  Phase::completed};
    CHECK_MESSAGE(from_postcopy(phases) == want, names(phases));
}

// The source's serve loop is held on a demand request: the destination hears nothing
// on the urgent channel for the heartbeat timeout and pauses; its closing the link
// pauses the source.
TEST_CASE("recover/heartbeat-silence-pauses-both-sides-then-recover") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 8u << 20, {}, {.heartbeat = 600ms, .recover_timeout = 30s, .bulk_channels = 1});
    PushGate gate(1);
    auto serve = std::make_shared<Flag>();
    auto served = std::make_shared<std::atomic<int>>(0);
    lazymig::failpoint::arm("source_serve_request", [serve, served](const lazymig::failpoint::Site&) {
        if (++*served == 1) (void)serve->wait_for();  // the first request only
        return 0;
    });
    pair.migrate();
    REQUIRE(gate.wait_held());
    std::atomic<bool> read_ok{false};
    Threads guest([&] { pair.cancel(); });
    guest.spawn([&] { read_ok = reads_source_page(pair, 100); });
    REQUIRE(eventually([&] { return pair.dst().stats().phase == Phase::paused; }));
    {
        const auto why = pair.counts().why(true);
        CHECK_MESSAGE(why.back().find("nothing received for") != std::string::npos, why.back());
        CHECK_MESSAGE(why.back().find("(heartbeat timeout 600 ms)") != std::string::npos, why.back());
    }
    serve->set();
    gate.open();  // the held batch meets the closed link (the source has not paused yet)
    REQUIRE(both_in(pair, Phase::paused));
    CHECK(pair.dst().stats().pauses == 1);
    CHECK(pair.dst().stats().error.empty());

    auto d = pair.dst().recover("tcp:127.0.0.1:0");
    REQUIRE_MESSAGE(d.has_value(), err_of(d));
    auto s = pair.src().recover(pair.dst().local_uri());
    REQUIRE_MESSAGE(s.has_value(), err_of(s));
    REQUIRE(guest.wait_all(30s));
    CHECK(read_ok);
    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
}

TEST_CASE("recover/second-failure-while-recovering-pauses-again-then-recovers") {
    SigbusGuard guard;
    Pair pair(Backing::memfd, 8u << 20, {}, {.recover_timeout = 30s, .bulk_channels = 2});
    PushGate gate(2);
    auto hits = std::make_shared<std::atomic<int>>(0);
    lazymig::failpoint::arm("recover_handshake", [hits](const lazymig::failpoint::Site&) {
        return ++*hits == 1 ? ECONNRESET : 0;  // the first resume handshake drops
    });
    pair.migrate();
    REQUIRE(gate.wait_held());
    // RESUMED reaches the source (whose pusher then starts) just before the destination
    // enters postcopy itself.
    REQUIRE(eventually([&] { return pair.dst().stats().phase == Phase::postcopy; }));
    REQUIRE(pair.dst().pause().has_value());  // this time the destination pauses
    REQUIRE(eventually([&] { return pair.dst().stats().phase == Phase::paused; }));
    gate.open();  // the held batch meets the closed link: the source pauses too
    REQUIRE(both_in(pair, Phase::paused));
    gate.close();

    REQUIRE(pair.dst().recover("tcp:127.0.0.1:0").has_value());
    const std::string uri = pair.dst().local_uri();
    REQUIRE(pair.src().recover(uri).has_value());
    REQUIRE(eventually([&] { return pair.src().stats().pauses == 2 && pair.dst().stats().pauses == 2; }));
    REQUIRE(both_in(pair, Phase::paused));
    CHECK(*hits == 1);
    CHECK(pair.src().stats().recoveries == 0);

    // The same address again.
    auto again = pair.dst().recover(uri);
    REQUIRE_MESSAGE(again.has_value(), err_of(again));
    CHECK(pair.dst().local_uri() == uri);
    REQUIRE(pair.src().recover(uri).has_value());
    gate.open();
    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
    const std::vector<Phase> want{Phase::postcopy, Phase::paused,   Phase::recovering, Phase::paused,
                                  Phase::recovering, Phase::postcopy, Phase::completed};
    CHECK_MESSAGE(from_postcopy(pair.counts().phases(false)) == want, names(pair.counts().phases(false)));
    CHECK_MESSAGE(from_postcopy(pair.counts().phases(true)) == want, names(pair.counts().phases(true)));
}

namespace {

// Reads one frame over TLS: its type and payload (type invalid on failure).
std::pair<lazymig::proto::Type, std::vector<std::byte>> read_frame(SSL* ssl) {
    std::array<std::byte, lazymig::proto::kHeaderSize> head{};
    auto read_all = [&](void* dst, std::size_t n) {
        std::size_t got = 0;
        while (got < n) {
            const int r = SSL_read(ssl, static_cast<char*>(dst) + got, static_cast<int>(n - got));
            if (r <= 0) return false;
            got += static_cast<std::size_t>(r);
        }
        return true;
    };
    if (!read_all(head.data(), head.size())) return {lazymig::proto::Type::invalid, {}};
    auto h = lazymig::proto::parse_header(head, "test");
    if (!h) return {lazymig::proto::Type::invalid, {}};
    std::vector<std::byte> payload(h->length);
    if (!read_all(payload.data(), payload.size())) return {lazymig::proto::Type::invalid, {}};
    return {h->type, payload};
}

}  // namespace

TEST_CASE("recover/strangers-on-the-recover-address-refused-then-the-source-recovers") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 8u << 20, {}, {.handshake = 1'500ms, .recover_timeout = 30s, .bulk_channels = 1});
    PushGate gate(2);
    pair.migrate();
    REQUIRE(gate.wait_held());
    REQUIRE(pair.src().pause().has_value());
    gate.drop_held();
    REQUIRE(both_in(pair, Phase::paused));
    REQUIRE(pair.dst().recover("tcp:127.0.0.1:0").has_value());
    const auto port = port_of(pair.dst().local_uri());
    const auto refused_before = pair.dst().stats().refused_peers;

    {  // Another migration's key: refused in the TLS handshake.
        const int fd = connect_to(port);
        testkey::Tls tls(fd, false, testkey::random_key());
        CHECK_FALSE(tls.ok());
        ::close(fd);
    }
    REQUIRE(eventually([&] { return pair.dst().stats().refused_peers == refused_before + 1; }));
    {  // The right key, another session id: told why and closed.
        const int fd = connect_to(port);
        testkey::Tls tls(fd, false, testkey::key());
        REQUIRE_MESSAGE(tls.ok(), tls.error());
        const auto resume = lazymig::proto::encode(lazymig::proto::Resume{.session = 0x5eed, .bulk_channels = 1});
        REQUIRE(SSL_write(tls.ssl(), resume.data(), static_cast<int>(resume.size())) == static_cast<int>(resume.size()));
        auto [type, payload] = read_frame(tls.ssl());
        REQUIRE(type == lazymig::proto::Type::error);
        auto msg = lazymig::proto::decode_error(payload);
        REQUIRE(msg.has_value());
        CHECK_MESSAGE(msg->text.find("RESUME from another migration (session 0x5eed, expected") != std::string::npos,
                      msg->text);
        CHECK(read_frame(tls.ssl()).first == lazymig::proto::Type::invalid);  // then closed
        ::close(fd);
    }
    CHECK(pair.dst().stats().refused_resumes == 1);
    CHECK(pair.dst().stats().phase == Phase::recovering);

    REQUIRE(pair.src().recover(pair.dst().local_uri()).has_value());
    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
}

// Paused longer than recover_timeout: the destination takes the source as lost.
TEST_CASE("recover/recover-timeout-stops-the-vm-naming-the-missing-pages") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 8u << 20, {}, {.recover_timeout = 1'000ms, .bulk_channels = 1});
    PushGate gate(1);  // nothing is pushed: what arrives is what the guest asked for
    pair.migrate();
    REQUIRE(gate.wait_held());
    CHECK(reads_source_page(pair, 10));
    CHECK(reads_source_page(pair, 20));
    REQUIRE(pair.src().pause().has_value());
    gate.drop_held();
    REQUIRE(both_in(pair, Phase::paused));
    // A guest thread blocked on a missing page is released with SIGBUS, not zeroes.
    std::atomic<bool> read_ok{true};
    Threads guest([&] { pair.cancel(); });
    guest.spawn([&] {
        std::vector<std::byte> got(kPage);
        read_ok = guarded_read(got.data(), pair.dst_page(50), kPage);
    });

    auto dst = bounded_wait(pair.dst());
    REQUIRE_FALSE(dst.has_value());
    const auto n = pair.pages();
    const std::string msg = dst.error().message();
    CHECK_MESSAGE(msg.starts_with("destination: post-copy paused for 1000 ms (recover_timeout) without recover() ("),
                  msg);
    CHECK_MESSAGE(msg.find(fmt::format("the source is taken as lost; the VM cannot continue: {} of {} pages never "
                                       "arrived (poisoned: a touch raises SIGBUS): ram0 pages 0..9, 11..19, 21..{}; "
                                       "its vCPUs were stopped",
                                       n - 2, n, n - 1)) != std::string::npos,
                  msg);
    REQUIRE(guest.wait_all(30s));
    CHECK_FALSE(read_ok);
    const auto ds = pair.dst().stats();
    CHECK(ds.phase == Phase::failed);
    CHECK(ds.vm_stopped);
    CHECK(ds.pages_missing == n - 2);
    CHECK(ds.pages_poisoned == n - 2);
    CHECK(pair.counts().dst_pause == 1);

    auto src = bounded_wait(pair.src());
    REQUIRE_FALSE(src.has_value());
    CHECK(src.error().message().find("the destination may be running the VM: it was not resumed here") !=
          std::string::npos);
    CHECK(pair.counts().src_resume == 0);
}

TEST_CASE("recover/recover-timeout-with-poison-on-loss-poisons-only-the-missing-pages") {
    SigbusGuard guard;
    Pair pair(Backing::memfd, 8u << 20, {}, {.recover_timeout = 1'000ms, .poison_on_loss = true, .bulk_channels = 1});
    PushGate gate(1);
    pair.migrate();
    REQUIRE(gate.wait_held());
    CHECK(reads_source_page(pair, 10));
    REQUIRE(eventually([&] { return pair.dst().stats().phase == Phase::postcopy; }));
    REQUIRE(pair.dst().pause().has_value());
    REQUIRE(eventually([&] { return pair.dst().stats().phase == Phase::paused; }));
    gate.open();  // the held batch meets the closed link: never placed here
    REQUIRE(both_in(pair, Phase::paused));

    auto dst = bounded_wait(pair.dst());
    REQUIRE_FALSE(dst.has_value());
    const auto n = pair.pages();
    CHECK_MESSAGE(dst.error().message().find(fmt::format(
                      "the source is lost: {} of {} pages never arrived (ram0 pages 0..9, 11..{}): poisoned "
                      "(poison_on_loss): the guest gets a memory error (SIGBUS) on those pages only and keeps running",
                      n - 1, n, n - 1)) != std::string::npos,
                  dst.error().message());
    const auto ds = pair.dst().stats();
    CHECK_FALSE(ds.vm_stopped);
    CHECK(ds.pages_poisoned == n - 1);
    CHECK(pair.counts().dst_pause == 0);  // the vCPUs run on
    CHECK(reads_source_page(pair, 10));   // a present page reads correctly
    std::vector<std::byte> got(kPage);
    CHECK_FALSE(guarded_read(got.data(), pair.dst_page(11), kPage));  // a missing one: memory error
    CHECK_FALSE(guarded_read(got.data(), pair.dst_page(n - 1), kPage));
}
