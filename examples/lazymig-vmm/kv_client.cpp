// `lazymig-vmm kv-client`: the kv workload's client. Writes sequence-numbered keys and
// records every acknowledged one; --verify reads each acknowledged write back. A write
// that was acknowledged and cannot be read back with its value is a loss: exit 1.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <vector>

#include <fmt/format.h>

#include "fd.hpp"
#include "guest_layout.hpp"
#include "options.hpp"

namespace vmm {

namespace {
class LineConn {
public:
    static lazymig::Result<LineConn> open(std::uint16_t port) {
        LineConn c;
        c.fd_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!c.fd_) return lazymig::sys_error("socket");
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons(port);
        if (::connect(c.fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
            return lazymig::sys_error(fmt::format("connect 127.0.0.1:{}", port));
        const int one = 1;
        if (::setsockopt(c.fd_.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
            return lazymig::sys_error("setsockopt TCP_NODELAY");
        return c;
    }
    // One request, one response line; the wait is bounded.
    lazymig::Result<std::string> request(const std::string& line, double timeout_s) {
        const std::string out = line + "\n";
        if (::send(fd_.get(), out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size()))
            return lazymig::sys_error("send request");
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
        for (;;) {
            if (auto nl = in_.find('\n'); nl != std::string::npos) {
                std::string r = in_.substr(0, nl);
                in_.erase(0, nl + 1);
                return r;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) return lazymig::logic_error(fmt::format("no response within {} s", timeout_s));
            pollfd p{fd_.get(), POLLIN, 0};
            if (::poll(&p, 1, static_cast<int>(left.count())) < 0 && errno != EINTR) return lazymig::sys_error("poll");
            if (!(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char buf[1024];
            const ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
            if (n == 0) return lazymig::logic_error("the service closed the connection");
            if (n < 0 && errno != EINTR) return lazymig::sys_error("recv response");
            if (n > 0) in_.append(buf, static_cast<std::size_t>(n));
        }
    }

private:
    UniqueFd fd_;
    std::string in_;
};

std::string key_of(const KvClientOptions& o, std::uint64_t seq) { return fmt::format("{}{:09}", o.prefix, seq); }
std::string value_of(std::uint64_t seq) { return fmt::format("v{}-{:016x}", seq, mix64(seq + 0x5eed)); }

int write_keys(const KvClientOptions& o) {
    std::FILE* state = nullptr;
    if (!o.state.empty() && !(state = std::fopen(o.state.c_str(), "w")))
        return fmt::print(stderr, "kv-client: open {}: {} (errno {})\n", o.state, std::strerror(errno), errno), 1;
    std::uint16_t port = o.port;
    auto conn = LineConn::open(port);
    if (!conn) return fmt::print(stderr, "kv-client: {}\n", conn.error().message()), 1;
    std::uint64_t acked = 0, acked_after_failover = 0;
    bool failed_over = false;
    int rc = 0;
    for (std::uint64_t seq = 0; seq < o.keys && rc == 0;) {
        auto r = conn->request(fmt::format("SET {} {}", key_of(o, seq), value_of(seq)), o.timeout_s);
        if (r && *r == "OK") {
            ++acked;
            if (failed_over) ++acked_after_failover;
            if (state) fmt::print(state, "{}\n", seq), std::fflush(state);  // each ack is on disk before the next write
            ++seq;
            continue;
        }
        if (r) {
            fmt::print(stderr, "kv-client: SET {}: {}\n", key_of(o, seq), *r);
            rc = 1;
        } else if (o.failover_port && !failed_over) {
            // The VM moved: the unacknowledged write is sent again to the new home (SET is idempotent).
            fmt::print("kv-client: port {} lost after {} acks ({}); continuing on port {}\n", port, acked,
                       r.error().message(), o.failover_port);
            port = o.failover_port;
            failed_over = true;
            conn = LineConn::open(port);
            if (!conn) fmt::print(stderr, "kv-client: {}\n", conn.error().message()), rc = 1;
        } else {
            fmt::print(stderr, "kv-client: SET {} on port {}: {}\n", key_of(o, seq), port, r.error().message());
            rc = 1;
        }
    }
    if (state) std::fclose(state);
    fmt::print("kv-client: {} of {} writes acknowledged ({} after failover)\n", acked, o.keys, acked_after_failover);
    return rc;
}

int verify_keys(const KvClientOptions& o) {
    std::vector<std::uint64_t> seqs;
    if (o.state.empty()) {
        for (std::uint64_t s = 0; s < o.keys; ++s) seqs.push_back(s);
    } else {
        std::ifstream in(o.state);
        if (!in) return fmt::print(stderr, "kv-client: cannot read {}\n", o.state), 1;
        for (std::uint64_t s; in >> s;) seqs.push_back(s);
    }
    auto conn = LineConn::open(o.port);
    if (!conn) return fmt::print(stderr, "kv-client: {}\n", conn.error().message()), 1;
    std::uint64_t good = 0, missing = 0, wrong = 0;
    for (std::uint64_t seq : seqs) {
        auto r = conn->request("GET " + key_of(o, seq), o.timeout_s);
        if (!r) return fmt::print(stderr, "kv-client: GET {}: {}\n", key_of(o, seq), r.error().message()), 1;
        if (*r == "VALUE " + value_of(seq)) {
            ++good;
            continue;
        }
        if (*r == "NOTFOUND") ++missing;
        else ++wrong;
        if (missing + wrong <= 5) fmt::print(stderr, "kv-client: {}: got '{}', expected 'VALUE {}'\n", key_of(o, seq), *r, value_of(seq));
    }
    fmt::print("kv-client: verified {} acknowledged writes: {} ok, {} missing, {} wrong\n", seqs.size(), good, missing, wrong);
    return missing + wrong == 0 ? 0 : 1;
}
}  // namespace

int run_kv_client(const KvClientOptions& o) { return o.verify ? verify_keys(o) : write_keys(o); }

}  // namespace vmm
