// Trust and liveness against a real Source and Destination: strangers refused before
// anything is placed while the real migration completes; a silent destination before
// GO gives the VM back to the source, after GO never; a partition during post-copy is
// noticed by both sides, which pause and then recover. Interleavings come from fail points; the strangers' own pace
// is what they are, never what a check waits for.
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>

#include <fmt/format.h>

#include "src/net/socket.hpp"
#include "src/protocol.hpp"
#include "tests/race/harness.hpp"

using namespace race;
using namespace std::chrono_literals;

namespace {

// Reads until the listener closes the connection; true if no byte of a lazymig frame
// came back (a TLS alert may).
bool closed_without_frames(int fd) {
    std::byte buf[512];
    bool frame = false;
    for (;;) {
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET)) return !frame;
        if (n < 0) return false;  // the timeout: never closed
        if (n >= 4 && std::memcmp(buf, "LZMG", 4) == 0) frame = true;
    }
}

}  // namespace

TEST_CASE("trust/strangers-refused-then-the-real-source-migrates") {
    SigbusGuard guard;
    Pair pair(pick_backing(), 8u << 20, {}, {.handshake = 1'500ms});
    const auto port = port_of(pair.dst().local_uri());

    // No key: a well-formed HELLO in the clear.
    const int plain = connect_to(port);
    const auto hello = lazymig::proto::encode(lazymig::proto::Hello{
        .channel = lazymig::proto::Channel::urgent, .mode = lazymig::Mode::postcopy, .session = 1});
    REQUIRE(::send(plain, hello.data(), hello.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(hello.size()));
    CHECK(closed_without_frames(plain));
    ::close(plain);
    // A wrong key under another identity, and another migration's key under ours.
    for (auto [key, identity] : {std::pair{testkey::random_key(), std::string("intruder")},
                                 std::pair{testkey::random_key(), std::string("lazymig")}}) {
        const int fd = connect_to(port);
        testkey::Tls tls(fd, false, key, identity);
        CHECK_FALSE(tls.ok());
        ::close(fd);
    }
    // Connects and closes; connects and stays silent; sends one byte a second.
    ::close(connect_to(port));
    const int silent = connect_to(port);
    const int slow = connect_to(port);
    std::thread slowloris([slow] {
        for (int i = 0; i < 60; ++i) {  // until the listener closes it
            const char b = 0x16;        // the first byte of a TLS handshake record
            if (::send(slow, &b, 1, MSG_NOSIGNAL) != 1) return;
            std::this_thread::sleep_for(1s);
        }
    });
    REQUIRE(eventually([&] { return pair.dst().stats().refused_peers >= 4; }));
    {
        const auto st = pair.dst().stats();
        CHECK(st.phase == lazymig::Phase::idle);
        CHECK(st.pages_present == 0);
        CHECK(st.bytes_received == 0);
        CHECK(pair.counts().dst_resume == 0);
    }

    pair.migrate();
    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
    const auto st = pair.dst().stats();
    CHECK(st.refused_peers == 6);  // the silent and the slow ones too: by deadline or at close
    CHECK(st.tls == "userspace");
    CHECK(st.auth == "psk");
    slowloris.join();
    ::close(silent);
    ::close(slow);
}

TEST_CASE("trust/destination-silent-before-go-the-source-resumes-its-vm") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 4u << 20, {}, {.switchover = 1'500ms});
    auto release = std::make_shared<Flag>();
    auto held = std::make_shared<Flag>();
    lazymig::failpoint::arm("destination_before_device_loaded", [release, held](const lazymig::failpoint::Site&) {
        held->set();
        (void)release->wait_for();
        return 0;
    });
    pair.migrate();
    REQUIRE(held->wait_for());
    auto src = bounded_wait(pair.src());
    release->set();
    REQUIRE_FALSE(src.has_value());
    CHECK(src.error().message() ==
          "source: the destination did not confirm the device state (DEVICE_LOADED) in time; the VM resumes on "
          "the source (the destination never ran it) (deadline 1500 ms): Connection timed out (errno 110)");
    CHECK(src.error().kind == lazymig::ErrorClass::transport_lost);
    CHECK(pair.counts().src_pause == 1);
    CHECK(pair.counts().src_resume == 1);  // the VM runs at the source again
    CHECK(pair.source_intact());
    CHECK(pair.src().stats().phase == lazymig::Phase::failed);
    auto dst = bounded_wait(pair.dst());
    CHECK_FALSE(dst.has_value());
    CHECK(pair.counts().dst_resume == 0);  // never ran there
    lazymig::failpoint::disarm_all();
}

TEST_CASE("trust/destination-silent-after-go-the-source-never-resumes") {
    SigbusGuard guard;
    Pair pair(Backing::anon, 4u << 20, {}, {.switchover = 1'500ms});
    auto release = std::make_shared<Flag>();
    auto held = std::make_shared<Flag>();
    lazymig::failpoint::arm("destination_after_go", [release, held](const lazymig::failpoint::Site&) {
        held->set();
        (void)release->wait_for();
        return 0;
    });
    pair.migrate();
    REQUIRE(held->wait_for());
    auto src = bounded_wait(pair.src());
    release->set();
    REQUIRE_FALSE(src.has_value());
    CHECK(src.error().message() ==
          "source: GO was sent and the destination did not report RESUMED in time (deadline 1500 ms); GO was "
          "sent, so the destination may be running the VM: it was not resumed here: Connection timed out (errno 110)");
    CHECK(pair.counts().src_resume == 0);
    (void)bounded_wait(pair.dst());
    lazymig::failpoint::disarm_all();
}

// Drops every packet on the loopback of a network namespace made for this test, while
// post-copy runs (the pusher held at its first batch keeps it running): each side's
// heartbeat notices and pauses; with the loopback up again, recover completes it.
TEST_CASE("trust/partition-during-postcopy-pauses-both-sides-then-recovers") {
    if (::geteuid() != 0) {
        MESSAGE("skipped: needs root for a network namespace");
        return;
    }
    const std::string ns = fmt::format("i8-trust-{}", ::getpid());
    REQUIRE(std::system(fmt::format("ip netns add {}", ns).c_str()) == 0);
    const int home = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    const int there = ::open(fmt::format("/run/netns/{}", ns).c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(home >= 0);
    REQUIRE(there >= 0);
    // This thread (and every thread it starts: the endpoints') lives in the namespace.
    REQUIRE(::setns(there, CLONE_NEWNET) == 0);
    struct Back {
        int home, there;
        std::string ns;
        ~Back() {
            ::setns(home, CLONE_NEWNET);
            ::close(home);
            ::close(there);
            [[maybe_unused]] int rc = std::system(fmt::format("ip netns del {}", ns).c_str());
        }
    } back{home, there, ns};
    REQUIRE(std::system("ip link set lo up") == 0);
    {
        SigbusGuard guard;
        Pair pair(Backing::anon, 16u << 20, {}, {.heartbeat = 1'000ms});
        PusherHold hold;
        pair.migrate();
        REQUIRE(hold.wait_held());
        REQUIRE(eventually([&] { return pair.dst().stats().phase == lazymig::Phase::postcopy; }));
        // This kernel has no netem, clsact or netfilter to drop with; taking the
        // namespace's only link down drops every packet of the established connections
        // just the same (they are not reset: TCP keeps retransmitting into nothing).
        REQUIRE(std::system("ip link set lo down") == 0);
        const auto cut = std::chrono::steady_clock::now();
        hold.release();
        // Post-copy pauses on both sides (nothing fails), each by its own heartbeat.
        REQUIRE(eventually([&] {
            return pair.dst().stats().phase == lazymig::Phase::paused && pair.src().stats().phase == lazymig::Phase::paused;
        }));
        MESSAGE("detected after ", std::chrono::duration<double>(std::chrono::steady_clock::now() - cut).count(), " s");
        const auto dwhy = pair.counts().why(true).back();
        const auto swhy = pair.counts().why(false).back();
        CHECK_MESSAGE(dwhy.starts_with("post-copy paused: destination: urgent channel from the source: nothing received "
                                       "for "), dwhy);
        CHECK_MESSAGE(swhy.starts_with("post-copy paused: source: urgent channel to "), swhy);
        for (const auto& m : {dwhy, swhy})
            CHECK_MESSAGE(m.find("(heartbeat timeout 1000 ms): the link is lost") != std::string::npos, m);
        CHECK(pair.dst().stats().error.empty());
        CHECK(pair.src().stats().error.empty());
        // The link comes back: recover on a new port, and the migration completes.
        REQUIRE(std::system("ip link set lo up") == 0);
        auto d = pair.dst().recover("tcp:127.0.0.1:0");
        REQUIRE_MESSAGE(d.has_value(), err_of(d));
        auto s = pair.src().recover(pair.dst().local_uri());
        REQUIRE_MESSAGE(s.has_value(), err_of(s));
        auto outcome = pair.finish();
        pair.check_clean_end(outcome);
        CHECK(pair.pages_differing_from_source() == 0);
        CHECK(pair.counts().src_resume == 0);  // the VM ran at the destination: never here
    }
}

namespace {

// A CA, a destination certificate for dst.lazymig and a source one for src.lazymig, laid
// out as QEMU's tls-creds-x509 directories, made with the openssl command.
struct Creds {
    std::string root, dst, src;
    Creds() {
        char tmpl[] = "/tmp/lazymig-x509.XXXXXX";
        REQUIRE(::mkdtemp(tmpl) != nullptr);
        root = tmpl;
        dst = root + "/dst";
        src = root + "/src";
        const std::string script = fmt::format(R"(set -e; cd {0}; mkdir dst src
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca 2>/dev/null
for who in dst src; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr -subj /CN=$who.lazymig 2>/dev/null
  printf 'subjectAltName=DNS:%s.lazymig\n' $who >$who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 2 -extfile $who.ext 2>/dev/null
done
cp ca.pem dst/ca-cert.pem; cp ca.pem src/ca-cert.pem
cp dst.pem dst/server-cert.pem; cp dst.key dst/server-key.pem
cp src.pem src/client-cert.pem; cp src.key src/client-key.pem
chmod 600 dst/server-key.pem src/client-key.pem)", root);
        REQUIRE(std::system(script.c_str()) == 0);
    }
    ~Creds() { [[maybe_unused]] int rc = std::system(fmt::format("rm -rf {}", root).c_str()); }
    lazymig::Security side(const std::string& dir, const std::string& peer) const {
        return {.auth = lazymig::Auth::x509, .creds_dir = dir, .peer_name = peer};
    }
};

}  // namespace

TEST_CASE("trust/x509-both-sides-verified-by-name") {
    SigbusGuard guard;
    Creds c;
    Pair pair(Backing::anon, 4u << 20, {},
              {.dst_security = c.side(c.dst, "src.lazymig"), .src_security = c.side(c.src, "dst.lazymig")});
    pair.migrate();
    auto outcome = pair.finish();
    pair.check_clean_end(outcome);
    CHECK(pair.pages_differing_from_source() == 0);
    CHECK(pair.dst().stats().auth == "x509");
}

TEST_CASE("trust/x509-peer-name-mismatch-refused") {
    SigbusGuard guard;
    Creds c;
    // The destination allows only "other.lazymig": the real source's certificate is refused.
    Pair pair(Backing::anon, 4u << 20, {},
              {.handshake = 1'000ms, .dst_security = c.side(c.dst, "other.lazymig"),
               .src_security = c.side(c.src, "dst.lazymig")});
    pair.migrate();
    auto src = bounded_wait(pair.src());
    REQUIRE_FALSE(src.has_value());
    // TLS 1.3: the source's handshake ends before the destination judged its
    // certificate; the destination's alert then ends the source's first read.
    CHECK_MESSAGE(src.error().message().ends_with(": TLS: error:0A000412:SSL routines::sslv3 alert bad certificate"),
                  src.error().message());
    REQUIRE(eventually([&] { return pair.dst().stats().refused_peers >= 1; }));
    CHECK(pair.dst().stats().phase == lazymig::Phase::idle);
    CHECK(pair.counts().src_resume == 0);
    CHECK(pair.counts().src_pause == 0);
    pair.dst().cancel();
}
