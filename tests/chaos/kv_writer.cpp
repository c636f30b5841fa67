#include "kv_writer.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include <fmt/format.h>

namespace chaos {

namespace {
using Clock = std::chrono::steady_clock;

// One connection to a kv service: line requests, line responses, bounded waits.
class Line {
public:
    explicit Line(std::uint16_t port) {
        fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd_ < 0) return;
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons(port);
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
            why_ = fmt::format("connect 127.0.0.1:{}: {}", port, std::strerror(errno));
            ::close(fd_);
            fd_ = -1;
            return;
        }
        const int one = 1;
        ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    ~Line() {
        if (fd_ >= 0) ::close(fd_);
    }
    Line(const Line&) = delete;
    Line& operator=(const Line&) = delete;
    [[nodiscard]] bool ok() const { return fd_ >= 0; }
    [[nodiscard]] const std::string& why() const { return why_; }

    // Lines that arrived while no request was outstanding (duplicates), without waiting.
    std::uint64_t unsolicited() {
        std::uint64_t n = 0;
        for (;;) {
            char b[4096];
            const ssize_t r = ::recv(fd_, b, sizeof b, MSG_DONTWAIT);
            if (r <= 0) break;
            in_.append(b, std::size_t(r));
        }
        for (std::size_t nl; (nl = in_.find('\n')) != std::string::npos; in_.erase(0, nl + 1)) ++n;
        return n;
    }

    // The response line, or nothing (why() says) when the service is gone or silent.
    std::optional<std::string> request(const std::string& line, std::chrono::milliseconds timeout) {
        const std::string out = line + "\n";
        if (::send(fd_, out.data(), out.size(), MSG_NOSIGNAL) != ssize_t(out.size())) {
            why_ = fmt::format("send: {}", std::strerror(errno));
            return std::nullopt;
        }
        const auto end = Clock::now() + timeout;
        for (;;) {
            if (auto nl = in_.find('\n'); nl != std::string::npos) {
                std::string r = in_.substr(0, nl);
                in_.erase(0, nl + 1);
                return r;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
            if (left.count() <= 0) {
                why_ = fmt::format("no response within {} ms", timeout.count());
                return std::nullopt;
            }
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, int(left.count())) < 0 && errno != EINTR) {
                why_ = fmt::format("poll: {}", std::strerror(errno));
                return std::nullopt;
            }
            if (!(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char b[4096];
            const ssize_t r = ::recv(fd_, b, sizeof b, 0);
            if (r == 0 || (r < 0 && errno != EINTR)) {
                why_ = r == 0 ? "the service closed the connection" : fmt::format("recv: {}", std::strerror(errno));
                return std::nullopt;
            }
            if (r > 0) in_.append(b, std::size_t(r));
        }
    }

private:
    int fd_ = -1;
    std::string in_, why_;
};
}  // namespace

std::string KvWriter::key(std::uint64_t seq) { return fmt::format("chaos{:09}", seq); }
std::string KvWriter::value(std::uint64_t seq) { return fmt::format("c{}-{:016x}", seq, seq * 0x9e3779b97f4a7c15ull); }

KvWriter::KvWriter(std::vector<std::uint16_t> ports, std::uint64_t max_keys) : ports_(std::move(ports)), max_keys_(max_keys) {
    acked_.reserve(max_keys);
}
KvWriter::~KvWriter() { stop(); }

void KvWriter::start() { thread_ = std::thread([this] { run(); }); }

void KvWriter::stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
}

void KvWriter::wait_done() {
    if (thread_.joinable()) thread_.join();
}

void KvWriter::run() {
    std::size_t at = 0;
    std::optional<Line> conn;
    auto last_ack = Clock::now();
    std::uint64_t seq = 0;
    while (!stop_ && seq < max_keys_) {
        if (!conn || !conn->ok()) {
            if (Clock::now() - last_ack > kGiveUp) {
                error_ = fmt::format("no kv service answered for {} s (last: {})", kGiveUp.count(), conn ? conn->why() : "");
                return;
            }
            conn.emplace(ports_[at]);
            if (!conn->ok()) {
                // Nobody listens there (yet, or any more): the next port, after a bounded
                // wait so a restarting service is not hammered.
                at = (at + 1) % ports_.size();
                ::poll(nullptr, 0, 50);
                continue;
            }
        }
        duplicates_ += conn->unsolicited();
        auto r = conn->request(fmt::format("SET {} {}", key(seq), value(seq)), kRequestTimeout);
        if (!r) {
            conn.reset();
            at = (at + 1) % ports_.size();
            ++failovers_;
            continue;
        }
        if (*r != "OK") {
            error_ = fmt::format("SET {}: '{}'", key(seq), *r);
            return;
        }
        acked_.push_back(seq++);
        last_ack = Clock::now();
    }
    if (conn && conn->ok()) duplicates_ += conn->unsolicited();
}

KvWriter::Verdict KvWriter::verify(std::uint16_t port) const {
    Verdict v;
    Line conn(port);
    if (!conn.ok()) return v.error = conn.why(), v;
    for (std::uint64_t seq : acked_) {
        auto r = conn.request("GET " + key(seq), kRequestTimeout);
        if (!r) return v.error = fmt::format("GET {}: {}", key(seq), conn.why()), v;
        if (*r == "VALUE " + value(seq)) ++v.ok;
        else if (*r == "NOTFOUND") ++v.missing;
        else ++v.wrong;
    }
    return v;
}

}  // namespace chaos
