#include "fault_proxy.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace chaos {

namespace {
using Clock = std::chrono::steady_clock;

class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) reset(std::exchange(o.fd_, -1));
        return *this;
    }
    ~Fd() { reset(); }
    [[nodiscard]] int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }
    // Closes with an RST instead of a FIN: the peer sees its connection reset, as when
    // a middlebox drops it.
    void reset_hard() noexcept {
        if (fd_ < 0) return;
        const linger l{1, 0};
        ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        reset();
    }

private:
    int fd_ = -1;
};

[[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error(fmt::format("fault proxy: {}: {} (errno {})", what, std::strerror(errno), errno));
}

// Bytes one way: read from `from` into buf, written to the other side.
struct Direction {
    std::vector<char> buf = std::vector<char>(FaultProxy::kBufferBytes);
    std::size_t head = 0, len = 0;
    std::uint64_t forwarded = 0;
    bool eof = false;       // the reading side sent FIN
    bool shut = false;      // FIN passed on (shutdown(SHUT_WR)) once the buffer drained
    [[nodiscard]] std::size_t room() const noexcept { return buf.size() - head - len; }
    void compact() noexcept {
        if (head == 0) return;
        std::memmove(buf.data(), buf.data() + head, len);
        head = 0;
    }
};

struct Conn {
    int id = 0;
    Fd client, upstream;
    bool connecting = true;
    bool open = true;
    Direction up, down;  // up: client (source) → upstream (destination)
    std::uint32_t mask_client = 0, mask_upstream = 0;
    bool hup_client = false, hup_upstream = false;  // deregistered after EPOLLHUP
    std::optional<std::uint64_t> corrupted_at;
    std::string why_closed;
};

// epoll_event.data.u64: the kind in the high 32 bits, an index or id in the low ones.
enum Kind : std::uint64_t { kWake = 1, kListener, kControlListener, kControl, kClient, kUpstream };
std::uint64_t tag(Kind k, std::uint32_t i) { return (std::uint64_t(k) << 32) | i; }

void set_nodelay(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

Fd listen_tcp(std::uint16_t port, std::uint16_t* bound) {
    Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!s) fail("socket");
    const int one = 1;
    ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    if (::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) fail(fmt::format("bind 127.0.0.1:{}", port));
    if (::listen(s.get(), 64) != 0) fail("listen");
    socklen_t l = sizeof a;
    if (::getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &l) != 0) fail("getsockname");
    *bound = ntohs(a.sin_port);
    return s;
}
}  // namespace

class FaultProxy::Impl {
public:
    explicit Impl(const ProxyConfig& c) : target_port_(c.target_port), control_path_(c.control) {
        epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
        if (!epoll_) fail("epoll_create1");
        wake_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake_) fail("eventfd");
        add(wake_.get(), EPOLLIN, tag(kWake, 0));
        add_listener(c.listen_port);
        control_ = Fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        if (!control_) fail("socket AF_UNIX");
        sockaddr_un u{};
        u.sun_family = AF_UNIX;
        if (c.control.size() >= sizeof u.sun_path) throw std::runtime_error("fault proxy: control path too long: " + c.control);
        std::memcpy(u.sun_path, c.control.c_str(), c.control.size() + 1);
        ::unlink(c.control.c_str());
        if (::bind(control_.get(), reinterpret_cast<sockaddr*>(&u), sizeof u) != 0) fail("bind " + c.control);
        if (::listen(control_.get(), 8) != 0) fail("listen " + c.control);
        add(control_.get(), EPOLLIN, tag(kControlListener, 0));
    }
    ~Impl() { ::unlink(control_path_.c_str()); }

    std::uint16_t port() const noexcept { return ports_.front(); }
    void stop() noexcept {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof one);
    }

    std::string run() {
        try {
            return loop();
        } catch (const std::exception& e) {  // a syscall that must not fail did (fail() names it)
            return e.what();
        }
    }

private:
    std::string loop() {
        std::vector<epoll_event> evs(64);
        while (!quit_) {
            const auto now = Clock::now();
            refill(now);
            for (auto& [id, c] : conns_) update(*c);
            const int n = ::epoll_wait(epoll_.get(), evs.data(), int(evs.size()), timeout_ms(now));
            if (n < 0) {
                if (errno == EINTR) continue;
                return fmt::format("fault proxy: epoll_wait: {} (errno {})", std::strerror(errno), errno);
            }
            if (n == 0 || stalled_until_ || throttle_) {  // time passed: a stall may have ended, tokens refilled
                if (stalled_until_ && Clock::now() >= *stalled_until_) stalled_until_.reset();
                refill(Clock::now());
                for (auto& [id, c] : conns_) pump(*c);
            }
            for (int i = 0; i < n; ++i) dispatch(evs[i]);
        }
        return {};
    }

    void add(int fd, std::uint32_t events, std::uint64_t data) {
        epoll_event e{};
        e.events = events;
        e.data.u64 = data;
        if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &e) != 0) fail("epoll_ctl ADD");
    }
    void add_listener(std::uint16_t port) {
        std::uint16_t bound = 0;
        listeners_.push_back(listen_tcp(port, &bound));
        ports_.push_back(bound);
        add(listeners_.back().get(), EPOLLIN, tag(kListener, std::uint32_t(listeners_.size() - 1)));
    }

    int timeout_ms(Clock::time_point now) const {
        auto t = std::chrono::milliseconds(1000);  // every wait is bounded
        if (stalled_until_)
            t = std::min(t, std::chrono::ceil<std::chrono::milliseconds>(*stalled_until_ - now) + std::chrono::milliseconds(1));
        if (throttle_ && tokens_ < want_tokens()) {
            const double ms = (want_tokens() - tokens_) * 1000.0 / double(throttle_);
            t = std::min(t, std::chrono::milliseconds(std::int64_t(ms) + 1));
        }
        return int(std::max<std::int64_t>(t.count(), 0));
    }

    // Throttle: a token bucket over every connection and direction.
    static constexpr std::size_t kThrottleChunk = 4096;
    double burst() const { return std::max(double(throttle_) / 10, 1.0); }
    double want_tokens() const { return std::min(burst(), 16384.0); }
    void refill(Clock::time_point now) {
        if (!throttle_) return;
        const double secs = std::chrono::duration<double>(now - refilled_).count();
        tokens_ = std::min(burst(), tokens_ + secs * double(throttle_));
        refilled_ = now;
    }
    bool stalled() const { return stalled_until_ && Clock::now() < *stalled_until_; }
    // Whether the throttle applies to a direction (`throttle BPS up`: source → target only).
    bool throttled(bool upward) const { return throttle_ && (upward || !throttle_up_only_); }
    // How many bytes may be written now.
    std::size_t allowance(std::size_t want, bool upward) const {
        if (stalled()) return 0;
        if (!throttled(upward)) return want;
        return std::min(want, std::size_t(tokens_));
    }

    void set_mask(Conn& c, int fd, bool hup, std::uint32_t want, std::uint32_t& have, Kind k) {
        if (!fd || hup || want == have) return;
        epoll_event e{};
        e.events = want;
        e.data.u64 = tag(k, std::uint32_t(c.id));
        if (::epoll_ctl(epoll_.get(), have == 0xffffffffu ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &e) != 0) fail("epoll_ctl");
        have = want;
    }
    void update(Conn& c) {
        if (!c.open) return;
        auto can_write = [&](bool upward) { return !stalled() && (!throttled(upward) || tokens_ >= 1); };
        std::uint32_t mc = 0, mu = 0;
        if (!c.connecting && !c.up.eof && c.up.room() + c.up.head > 0) mc |= EPOLLIN;
        if (c.down.len && can_write(false)) mc |= EPOLLOUT;
        if (c.connecting) {
            mu = EPOLLOUT;
        } else {
            if (!c.down.eof && c.down.room() + c.down.head > 0) mu |= EPOLLIN;
            if (c.up.len && can_write(true)) mu |= EPOLLOUT;
        }
        set_mask(c, c.client.get(), c.hup_client, mc, c.mask_client, kClient);
        set_mask(c, c.upstream.get(), c.hup_upstream, mu, c.mask_upstream, kUpstream);
    }

    void close_conn(Conn& c, const std::string& why, bool hard) {
        if (!c.open) return;
        c.open = false;
        c.why_closed = why;
        if (hard) {
            c.client.reset_hard();
            c.upstream.reset_hard();
        } else {
            c.client.reset();
            c.upstream.reset();
        }
    }

    // Reads what fits from `from` into d; false when the connection had to close.
    bool fill(Conn& c, int from, Direction& d) {
        while (!d.eof) {
            if (d.room() == 0) d.compact();
            if (d.room() == 0) return true;
            const ssize_t n = ::recv(from, d.buf.data() + d.head + d.len, d.room(), 0);
            if (n > 0) {
                d.len += std::size_t(n);
                continue;
            }
            if (n == 0) {
                d.eof = true;
                return true;
            }
            if (errno == EAGAIN || errno == EINTR) return true;
            close_conn(c, fmt::format("recv: {}", std::strerror(errno)), true);  // mirror the reset
            return false;
        }
        return true;
    }
    // Writes what is allowed of d to `to`; false when the connection had to close.
    bool drain(Conn& c, int to, Direction& d, bool upward) {
        // Throttled, a connection writes one chunk per turn: the connections share the
        // rate instead of the first busy one (a bulk channel) taking every token and
        // starving the others (the urgent channel, back-replication's acks).
        const bool metered = throttled(upward);
        while (d.len) {
            std::size_t allowed = allowance(d.len, upward);
            if (metered) allowed = std::min(allowed, kThrottleChunk);
            if (allowed == 0) return true;
            if (upward && corrupt_pending_ && (corrupt_conn_ == 0 || corrupt_conn_ == c.id)) {
                d.buf[d.head] = char(d.buf[d.head] ^ 0xff);
                c.corrupted_at = d.forwarded;
                corrupt_pending_ = false;
            }
            const ssize_t n = ::send(to, d.buf.data() + d.head, allowed, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) return true;
                close_conn(c, fmt::format("send: {}", std::strerror(errno)), true);
                return false;
            }
            d.head += std::size_t(n);
            d.len -= std::size_t(n);
            d.forwarded += std::uint64_t(n);
            if (metered) tokens_ -= double(n);
            if (d.len == 0) d.head = 0;
            if (metered) break;
        }
        if (d.len == 0 && d.eof && !d.shut) {
            d.shut = true;
            ::shutdown(to, SHUT_WR);
        }
        return true;
    }
    void pump(Conn& c) {
        if (!c.open || c.connecting) return;
        if (!fill(c, c.client.get(), c.up) || !fill(c, c.upstream.get(), c.down)) return;
        if (!drain(c, c.upstream.get(), c.up, true) || !drain(c, c.client.get(), c.down, false)) return;
        // A buffer that drained may take more now.
        if (!fill(c, c.client.get(), c.up) || !fill(c, c.upstream.get(), c.down)) return;
        if (c.up.shut && c.down.shut) close_conn(c, "closed by the peers", false);
    }

    void accept_on(int listener) {
        for (;;) {
            Fd s(::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
            if (!s) {
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                    fmt::print(stderr, "fault proxy: accept4: {} (errno {})\n", std::strerror(errno), errno);
                return;
            }
            if (cut_ || conns_.size() >= kMaxConnections) {
                s.reset_hard();  // refused: the connect succeeded in the kernel, then reset
                ++refused_;
                continue;
            }
            auto c = std::make_unique<Conn>();
            c->id = ++next_id_;
            c->mask_client = c->mask_upstream = 0xffffffffu;  // not registered yet
            set_nodelay(s.get());
            c->client = std::move(s);
            c->upstream = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
            if (!c->upstream) fail("socket");
            set_nodelay(c->upstream.get());
            sockaddr_in a{};
            a.sin_family = AF_INET;
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            a.sin_port = htons(target_port_);
            if (::connect(c->upstream.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS) {
                close_conn(*c, fmt::format("connect 127.0.0.1:{}: {}", target_port_, std::strerror(errno)), true);
            } else {
                update(*c);
            }
            conns_.emplace(c->id, std::move(c));
        }
    }

    void dispatch(const epoll_event& e) {
        const auto kind = Kind(e.data.u64 >> 32);
        const auto idx = std::uint32_t(e.data.u64);
        switch (kind) {
        case kWake: quit_ = true; return;
        case kListener: return accept_on(listeners_[idx].get());
        case kControlListener: return accept_control();
        case kControl: return read_control(idx);
        case kClient:
        case kUpstream: {
            auto it = conns_.find(int(idx));
            if (it == conns_.end() || !it->second->open) return;
            Conn& c = *it->second;
            const bool up = kind == kUpstream;
            const int fd = up ? c.upstream.get() : c.client.get();
            if (up && c.connecting) {
                int err = 0;
                socklen_t l = sizeof err;
                ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err != 0 || (e.events & (EPOLLERR | EPOLLHUP)))
                    return close_conn(c, fmt::format("connect 127.0.0.1:{}: {}", target_port_, std::strerror(err ? err : ECONNREFUSED)), true);
                c.connecting = false;
            }
            if (e.events & EPOLLHUP) {
                // Reported whatever the mask: take the fd out so it cannot spin; what is
                // left in its receive queue is read when the other side makes room.
                ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
                (up ? c.hup_upstream : c.hup_client) = true;
            }
            pump(c);
            if (c.open && (e.events & EPOLLERR)) close_conn(c, "socket error", true);
            return;
        }
        }
    }

    void accept_control() {
        for (;;) {
            Fd s(::accept4(control_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
            if (!s) return;
            if (controls_.size() >= kMaxControlClients) continue;  // closed: one too many
            const std::uint32_t id = ++next_control_;
            add(s.get(), EPOLLIN, tag(kControl, id));
            controls_.emplace(id, std::pair<Fd, std::string>(std::move(s), std::string()));
        }
    }

    void read_control(std::uint32_t id) {
        auto it = controls_.find(id);
        if (it == controls_.end()) return;
        auto& [fd, in] = it->second;
        char b[1024];
        const ssize_t n = ::recv(fd.get(), b, sizeof b, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) {
            controls_.erase(it);  // closing the fd takes it out of the epoll set
            return;
        }
        in.append(b, std::size_t(n));
        for (std::size_t nl; (nl = in.find('\n')) != std::string::npos;) {
            const std::string line = in.substr(0, nl);
            in.erase(0, nl + 1);
            const std::string reply = command(line);
            // Replies are short (≤ kMaxConnections lines): one send on a local socket.
            if (::send(fd.get(), reply.data(), reply.size(), MSG_NOSIGNAL | MSG_DONTWAIT) != ssize_t(reply.size())) {
                controls_.erase(it);
                return;
            }
        }
        if (in.size() > kMaxControlLine) controls_.erase(it);  // not a line: drop the client
    }

    std::string command(const std::string& line) {
        std::istringstream is(line);
        std::string cmd;
        is >> cmd;
        auto number = [&](std::uint64_t* v) { return bool(is >> *v); };
        std::uint64_t v = 0;
        if (cmd == "cut") {
            cut_ = true;
            std::size_t n = 0;
            for (auto& [id, c] : conns_)
                if (c->open) close_conn(*c, "cut", true), ++n;
            return fmt::format("ok cut {} connections\n", n);
        }
        if (cmd == "heal") {
            cut_ = false;
            stalled_until_.reset();
            return "ok healed\n";
        }
        if (cmd == "stall" && number(&v)) {
            if (v == 0) stalled_until_.reset();
            else stalled_until_ = Clock::now() + std::chrono::milliseconds(v);
            return fmt::format("ok stall {} ms\n", v);
        }
        if (cmd == "throttle" && number(&v)) {
            std::string dir;
            is >> dir;
            if (!dir.empty() && dir != "up") return fmt::format("error throttle BPS [up], not '{}'\n", line);
            throttle_ = v;
            throttle_up_only_ = dir == "up";
            tokens_ = 0;
            refilled_ = Clock::now();
            return fmt::format("ok throttle {} bytes/s{}\n", v, throttle_up_only_ ? " up" : "");
        }
        if (cmd == "corrupt") {
            corrupt_conn_ = number(&v) ? int(v) : 0;
            corrupt_pending_ = true;
            return "ok corrupt armed\n";
        }
        if (cmd == "close" && number(&v)) {
            auto it = conns_.find(int(v));
            if (it == conns_.end() || !it->second->open) return fmt::format("error no open connection {}\n", v);
            close_conn(*it->second, "closed by command", true);
            return fmt::format("ok closed {}\n", v);
        }
        if (cmd == "list") {
            std::string out;
            for (auto& [id, c] : conns_) {
                out += fmt::format("conn {} up {} down {} {}", id, c->up.forwarded, c->down.forwarded, c->open ? "open" : "closed");
                if (c->corrupted_at) out += fmt::format(" corrupted@{}", *c->corrupted_at);
                out += "\n";
            }
            return out + fmt::format("ok {} refused {}\n", conns_.size(), refused_);
        }
        if (cmd == "target" && number(&v) && v > 0 && v < 65536) {
            target_port_ = std::uint16_t(v);
            return fmt::format("ok target 127.0.0.1:{}\n", v);
        }
        if (cmd == "listen") {
            add_listener(0);
            return fmt::format("ok {}\n", ports_.back());
        }
        if (cmd == "quit") {
            quit_ = true;
            return "ok quit\n";
        }
        return fmt::format("error unknown or incomplete command '{}' (cut, heal, stall MS, throttle BPS, corrupt [K], "
                           "close K, list, target PORT, listen, quit)\n", line);
    }

    std::uint16_t target_port_;
    std::string control_path_;
    Fd epoll_, wake_, control_;
    std::vector<Fd> listeners_;
    std::vector<std::uint16_t> ports_;
    std::map<int, std::unique_ptr<Conn>> conns_;  // ≤ kMaxConnections, closed ones kept for `list`
    std::map<std::uint32_t, std::pair<Fd, std::string>> controls_;
    int next_id_ = 0;
    std::uint32_t next_control_ = 0;
    std::uint64_t refused_ = 0;
    bool quit_ = false, cut_ = false;
    std::optional<Clock::time_point> stalled_until_;
    std::uint64_t throttle_ = 0;
    bool throttle_up_only_ = false;
    double tokens_ = 0;
    Clock::time_point refilled_ = Clock::now();
    bool corrupt_pending_ = false;
    int corrupt_conn_ = 0;
};

FaultProxy::FaultProxy(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FaultProxy::~FaultProxy() = default;
std::unique_ptr<FaultProxy> FaultProxy::create(const ProxyConfig& config) {
    return std::unique_ptr<FaultProxy>(new FaultProxy(std::make_unique<Impl>(config)));
}
std::uint16_t FaultProxy::port() const noexcept { return impl_->port(); }
std::string FaultProxy::run() { return impl_->run(); }
void FaultProxy::stop() noexcept { impl_->stop(); }

}  // namespace chaos
