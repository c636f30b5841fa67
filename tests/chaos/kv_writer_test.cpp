// chaos/kv-writer/*: the runner's kv client against fake kv services in this process:
// it counts an ack seen twice, moves to the next port when its service goes, and its
// verify() names what an acknowledged write lost.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include "kv_writer.hpp"

namespace {

// A kv service on 127.0.0.1: SET k v → OK, GET k → VALUE v / NOTFOUND, over a store
// that several services may share (the VM that moved). `double_ack_at`: the N-th SET is
// answered twice; `close_after`: the connection is closed after that many SETs.
struct FakeKv {
    std::map<std::string, std::string>& store;
    std::mutex& mu;
    int double_ack_at = -1;
    int close_after = -1;
    int listener = -1;
    std::uint16_t port = 0;
    std::atomic<bool> stop{false};
    std::thread thread;

    FakeKv(std::map<std::string, std::string>& s, std::mutex& m, int double_ack, int close) :
        store(s), mu(m), double_ack_at(double_ack), close_after(close) {
        listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
        REQUIRE(::listen(listener, 8) == 0);
        socklen_t l = sizeof a;
        REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &l) == 0);
        port = ntohs(a.sin_port);
        thread = std::thread([this] { serve(); });
    }
    ~FakeKv() {
        stop = true;
        thread.join();
        ::close(listener);
    }
    void serve() {
        int sets = 0;
        while (!stop) {
            pollfd p{listener, POLLIN, 0};
            if (::poll(&p, 1, 50) <= 0) continue;  // bounded: `stop` is looked at every 50 ms
            const int c = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
            if (c < 0) continue;
            std::string in;
            bool open = true;
            while (open && !stop) {
                pollfd q{c, POLLIN, 0};
                if (::poll(&q, 1, 50) <= 0) continue;
                char b[4096];
                const ssize_t n = ::recv(c, b, sizeof b, 0);
                if (n <= 0) break;
                in.append(b, std::size_t(n));
                for (std::size_t nl; open && (nl = in.find('\n')) != std::string::npos;) {
                    std::istringstream is(in.substr(0, nl));
                    in.erase(0, nl + 1);
                    std::string op, k, v;
                    is >> op >> k >> v;
                    std::string reply;
                    {
                        std::lock_guard lock(mu);
                        if (op == "SET") {
                            store[k] = v;
                            reply = ++sets == double_ack_at ? "OK\nOK\n" : "OK\n";
                        } else {
                            auto it = store.find(k);
                            reply = it == store.end() ? "NOTFOUND\n" : "VALUE " + it->second + "\n";
                        }
                    }
                    (void)::send(c, reply.data(), reply.size(), MSG_NOSIGNAL);
                    if (op == "SET" && sets == close_after) open = false;
                }
            }
            ::close(c);
        }
    }
};

}  // namespace

TEST_CASE("chaos/kv-writer/an-ack-seen-twice-is-a-duplicate") {
    std::map<std::string, std::string> store;
    std::mutex mu;
    FakeKv kv(store, mu, 3, -1);
    chaos::KvWriter w({kv.port}, 10);
    w.start();
    w.wait_done();
    CHECK(w.error() == "");
    CHECK(w.acked() == 10);
    CHECK(w.duplicates() == 1);
    const auto v = w.verify(kv.port);
    CHECK(v.error == "");
    CHECK(v.ok == 10);
}

TEST_CASE("chaos/kv-writer/follows-the-service-and-verify-names-a-loss") {
    std::map<std::string, std::string> store;
    std::mutex mu;
    FakeKv a(store, mu, -1, 5);   // drops its client after 5 writes: the VM moved
    FakeKv b(store, mu, -1, -1);
    chaos::KvWriter w({a.port, b.port}, 20);
    w.start();
    w.wait_done();
    CHECK(w.error() == "");
    CHECK(w.acked() == 20);
    CHECK(w.failovers() >= 1);
    CHECK(w.duplicates() == 0);
    auto v = w.verify(b.port);
    CHECK(v.ok == 20);
    CHECK(v.missing == 0);
    {
        std::lock_guard lock(mu);
        store.erase(chaos::KvWriter::key(7));
        store[chaos::KvWriter::key(8)] = "stale";
    }
    v = w.verify(b.port);
    CHECK(v.ok == 18);
    CHECK(v.missing == 1);
    CHECK(v.wrong == 1);
}
