// chaos/proxy/*: the fault proxy itself, in this process on its own thread, between
// test sockets and a test listener: bytes arrive exact both ways, and each control
// command has its effect (and only it).
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fault_proxy.hpp"

using namespace std::chrono_literals;

namespace {

struct Sock {
    int fd = -1;
    Sock() = default;
    explicit Sock(int f) : fd(f) {}
    Sock(Sock&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
    Sock& operator=(Sock&& o) noexcept {
        std::swap(fd, o.fd);
        return *this;
    }
    ~Sock() {
        if (fd >= 0) ::close(fd);
    }
};

// Waits (bounded) for fd to be readable; false at the timeout.
bool readable(int fd, std::chrono::milliseconds t) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, int(t.count())) > 0;
}

// Reads exactly n bytes within `t`, or fewer if the stream ends or fails first.
std::string read_n(int fd, std::size_t n, std::chrono::milliseconds t = 20s) {
    std::string out;
    const auto end = std::chrono::steady_clock::now() + t;
    while (out.size() < n) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
        if (left.count() <= 0 || !readable(fd, left)) break;
        char b[65536];
        const ssize_t r = ::recv(fd, b, std::min(sizeof b, n - out.size()), 0);
        if (r <= 0) break;
        out.append(b, std::size_t(r));
    }
    return out;
}

// What a reset or closed peer looks like: recv returns 0 or fails, within `t`
// (bytes still on the way are read and dropped).
bool ended(int fd, std::chrono::milliseconds t = 10s) {
    const auto end = std::chrono::steady_clock::now() + t;
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
        if (left.count() <= 0 || !readable(fd, left)) return false;
        char b[4096];
        const ssize_t r = ::recv(fd, b, sizeof b, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) return true;
    }
}

void send_all(int fd, const std::string& s) {
    std::size_t off = 0;
    while (off < s.size()) {
        const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
        REQUIRE_MESSAGE(n > 0, "send: " << std::strerror(errno));
        off += std::size_t(n);
    }
}

Sock listen_any(std::uint16_t* port) {
    Sock s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(s.fd, 16) == 0);
    socklen_t l = sizeof a;
    REQUIRE(::getsockname(s.fd, reinterpret_cast<sockaddr*>(&a), &l) == 0);
    *port = ntohs(a.sin_port);
    return s;
}

Sock connect_to(std::uint16_t port) {
    Sock s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    REQUIRE(::connect(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    return s;
}

Sock accept_within(int listener, std::chrono::milliseconds t = 10s) {
    REQUIRE_MESSAGE(readable(listener, t), "nothing reached the target");
    return Sock(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
}

std::string random_bytes(std::size_t n, unsigned seed) {
    std::mt19937 g(seed);
    std::string s(n, '\0');
    for (auto& c : s) c = char(g());
    return s;
}

// The proxy on its own thread, a target listener, and a control connection.
struct Rig {
    char dir[32] = "/tmp/lazymig-proxy-XXXXXX";
    std::uint16_t target_port = 0;
    Sock target;
    std::unique_ptr<chaos::FaultProxy> proxy;
    std::thread thread;
    std::string run_result = "not run";
    Sock control;

    Rig() {
        REQUIRE(::mkdtemp(dir) != nullptr);
        target = listen_any(&target_port);
        const std::string path = std::string(dir) + "/proxy.sock";
        proxy = chaos::FaultProxy::create({.listen_port = 0, .target_port = target_port, .control = path});
        thread = std::thread([this] { run_result = proxy->run(); });
        control = Sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        sockaddr_un u{};
        u.sun_family = AF_UNIX;
        std::strcpy(u.sun_path, path.c_str());
        REQUIRE(::connect(control.fd, reinterpret_cast<sockaddr*>(&u), sizeof u) == 0);
    }
    ~Rig() {
        proxy->stop();
        thread.join();
        CHECK(run_result == "");
        ::rmdir(dir);
    }
    // Sends a command; returns every reply line up to and including the "ok"/"error" one.
    std::string cmd(const std::string& line) {
        send_all(control.fd, line + "\n");
        std::string out;
        for (;;) {
            const std::string c = read_n(control.fd, 1, 10s);
            REQUIRE_MESSAGE(c.size() == 1, "no reply to '" << line << "' within 10 s; so far: " << out);
            out += c;
            if (c == "\n") {
                const auto start = out.rfind('\n', out.size() - 2);
                const std::string last = out.substr(start == std::string::npos ? 0 : start + 1);
                if (last.starts_with("ok") || last.starts_with("error")) return out;
            }
        }
    }
    // A connection through the proxy: (source side, destination side).
    std::pair<Sock, Sock> connection() {
        Sock c = connect_to(proxy->port());
        Sock t = accept_within(target.fd);
        return {std::move(c), std::move(t)};
    }
};

}  // namespace

TEST_CASE("chaos/proxy/forwards-exact-bytes-both-ways") {
    Rig r;
    auto [src, dst] = r.connection();
    const std::string up = random_bytes(3 << 20, 1), down = random_bytes(1 << 20, 2);
    // Both ways at once, more than the proxy's buffers: its back-pressure, not a deadlock.
    std::thread writer([&, fd = src.fd] { send_all(fd, up); });
    send_all(dst.fd, down);
    const std::string got_up = read_n(dst.fd, up.size());
    writer.join();
    const std::string got_down = read_n(src.fd, down.size());
    CHECK(got_up.size() == up.size());
    CHECK((got_up == up));
    CHECK((got_down == down));
    CHECK(r.cmd("list") == "conn 1 up 3145728 down 1048576 open\nok 1 refused 0\n");
    // A FIN passes through: the destination sees the end, and the connection closes
    // once both have ended.
    ::shutdown(src.fd, SHUT_WR);
    CHECK(ended(dst.fd));
    ::shutdown(dst.fd, SHUT_WR);
    CHECK(ended(src.fd));
    CHECK(r.cmd("list") == "conn 1 up 3145728 down 1048576 closed\nok 1 refused 0\n");
}

TEST_CASE("chaos/proxy/close-one-connection-only") {
    Rig r;
    auto [s1, d1] = r.connection();
    auto [s2, d2] = r.connection();
    CHECK(r.cmd("close 1") == "ok closed 1\n");
    CHECK(ended(s1.fd));
    CHECK(ended(d1.fd));
    send_all(s2.fd, "still here");
    CHECK(read_n(d2.fd, 10) == "still here");
    CHECK(r.cmd("close 1") == "error no open connection 1\n");
    CHECK(r.cmd("list") == "conn 1 up 0 down 0 closed\nconn 2 up 10 down 0 open\nok 2 refused 0\n");
}

TEST_CASE("chaos/proxy/cut-until-heal") {
    Rig r;
    auto [s1, d1] = r.connection();
    auto [s2, d2] = r.connection();
    CHECK(r.cmd("cut") == "ok cut 2 connections\n");
    CHECK(ended(s1.fd));
    CHECK(ended(d1.fd));
    CHECK(ended(s2.fd));
    CHECK(ended(d2.fd));
    // Refused while cut: accepted, then reset, and nothing reaches the target.
    Sock s3 = connect_to(r.proxy->port());
    CHECK(ended(s3.fd));
    CHECK_FALSE(readable(r.target.fd, 200ms));
    CHECK(r.cmd("heal") == "ok healed\n");
    auto [s4, d4] = r.connection();
    send_all(s4.fd, "after heal");
    CHECK(read_n(d4.fd, 10) == "after heal");
    CHECK(r.cmd("list") == "conn 1 up 0 down 0 closed\nconn 2 up 0 down 0 closed\nconn 3 up 10 down 0 open\nok 3 refused 1\n");
}

TEST_CASE("chaos/proxy/stall-holds-bytes-both-ways-until-it-ends") {
    Rig r;
    auto [src, dst] = r.connection();
    CHECK(r.cmd("stall 60000") == "ok stall 60000 ms\n");
    send_all(src.fd, "held up");
    send_all(dst.fd, "held down");
    // Not a timing assertion: nothing may pass before the stall is lifted below.
    CHECK_FALSE(readable(dst.fd, 300ms));
    CHECK_FALSE(readable(src.fd, 10ms));
    CHECK(r.cmd("list") == "conn 1 up 0 down 0 open\nok 1 refused 0\n");
    CHECK(r.cmd("stall 0") == "ok stall 0 ms\n");
    CHECK(read_n(dst.fd, 7) == "held up");
    CHECK(read_n(src.fd, 9) == "held down");
    // A short stall ends by itself.
    CHECK(r.cmd("stall 200") == "ok stall 200 ms\n");
    send_all(src.fd, "later");
    CHECK(read_n(dst.fd, 5, 10s) == "later");
}

TEST_CASE("chaos/proxy/throttle-bounds-the-rate") {
    Rig r;
    auto [src, dst] = r.connection();
    CHECK(r.cmd("throttle 200000") == "ok throttle 200000 bytes/s\n");
    const std::string data = random_bytes(120000, 3);
    const auto t0 = std::chrono::steady_clock::now();
    std::thread writer([&, fd = src.fd] { send_all(fd, data); });
    const std::string got = read_n(dst.fd, data.size(), 20s);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    writer.join();
    CHECK((got == data));
    // The bucket starts empty and holds at most 20000 bytes: 120000 bytes take ≥ 0.5 s.
    CHECK(secs >= 0.5);
    CHECK(r.cmd("throttle 0") == "ok throttle 0 bytes/s\n");
    const std::string more = random_bytes(1 << 20, 4);
    std::thread w2([&, fd = src.fd] { send_all(fd, more); });
    CHECK((read_n(dst.fd, more.size()) == more));
    w2.join();
}

TEST_CASE("chaos/proxy/throttle-up-leaves-the-other-direction-free") {
    Rig r;
    auto [src, dst] = r.connection();
    CHECK(r.cmd("throttle 200000 up") == "ok throttle 200000 bytes/s up\n");
    // Down (target → source) is not throttled: 4 MiB would take over 20 s at the rate.
    const std::string down = random_bytes(4 << 20, 5);
    std::thread w1([&, fd = dst.fd] { send_all(fd, down); });
    CHECK((read_n(src.fd, down.size(), 15s) == down));
    w1.join();
    // Up is: 120000 bytes take >= 0.5 s (the bucket starts empty, holds at most 20000).
    const std::string up = random_bytes(120000, 6);
    const auto t0 = std::chrono::steady_clock::now();
    std::thread w2([&, fd = src.fd] { send_all(fd, up); });
    CHECK((read_n(dst.fd, up.size(), 20s) == up));
    CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() >= 0.5);
    w2.join();
    CHECK(r.cmd("throttle 1 sideways").starts_with("error throttle BPS [up]"));
}

TEST_CASE("chaos/proxy/corrupt-flips-one-byte-source-to-destination") {
    Rig r;
    auto [s1, d1] = r.connection();
    auto [s2, d2] = r.connection();
    send_all(s2.fd, "abcd");
    CHECK(read_n(d2.fd, 4) == "abcd");
    CHECK(r.cmd("corrupt 2") == "ok corrupt armed\n");
    // Connection 1 and the way back are untouched; connection 2's next byte is flipped.
    send_all(s1.fd, "clean");
    CHECK(read_n(d1.fd, 5) == "clean");
    send_all(d2.fd, "back");
    CHECK(read_n(s2.fd, 4) == "back");
    const std::string data = random_bytes(65536, 5);
    send_all(s2.fd, data);
    const std::string got = read_n(d2.fd, data.size());
    REQUIRE(got.size() == data.size());
    std::vector<std::size_t> diff;
    for (std::size_t i = 0; i < data.size(); ++i)
        if (got[i] != data[i]) diff.push_back(i);
    REQUIRE(diff.size() == 1);
    CHECK(diff[0] == 0);
    CHECK(char(got[0] ^ 0xff) == data[0]);
    CHECK(r.cmd("list") == "conn 1 up 5 down 0 open\nconn 2 up 65540 down 4 open corrupted@4\nok 2 refused 0\n");
    // Once only.
    send_all(s2.fd, data);
    CHECK((read_n(d2.fd, data.size()) == data));
}

TEST_CASE("chaos/proxy/new-port-and-new-target") {
    Rig r;
    std::uint16_t port2 = 0;
    Sock target2 = listen_any(&port2);
    const std::string reply = r.cmd("listen");
    REQUIRE(reply.starts_with("ok "));
    const auto new_port = std::uint16_t(std::stoi(reply.substr(3)));
    CHECK(new_port != r.proxy->port());
    CHECK(r.cmd("target " + std::to_string(port2)) == "ok target 127.0.0.1:" + std::to_string(port2) + "\n");
    Sock c = connect_to(new_port);
    Sock t = accept_within(target2.fd);
    send_all(c.fd, "moved");
    CHECK(read_n(t.fd, 5) == "moved");
    CHECK_FALSE(readable(r.target.fd, 10ms));
}

TEST_CASE("chaos/proxy/unknown-command-is-refused-with-the-list") {
    Rig r;
    CHECK(r.cmd("explode") ==
          "error unknown or incomplete command 'explode' (cut, heal, stall MS, throttle BPS, corrupt [K], close K, list, "
          "target PORT, listen, quit)\n");
    CHECK(r.cmd("stall") .starts_with("error unknown or incomplete command 'stall'"));
    CHECK(r.cmd("list") == "ok 0 refused 0\n");
}
