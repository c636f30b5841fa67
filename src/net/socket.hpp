// net/socket.hpp — TCP endpoints: parse "tcp:HOST:PORT", listen, accept, connect.
// Setup only; the data path is net/ring.hpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "lazymig/error.hpp"

namespace lazymig::net {

// An owned file descriptor.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(o.release()) {}
    Fd& operator=(Fd&& o) noexcept;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }
    [[nodiscard]] int get() const { return fd_; }
    [[nodiscard]] bool valid() const { return fd_ >= 0; }
    int release() { return std::exchange(fd_, -1); }
    void reset() noexcept;

private:
    int fd_ = -1;
};

struct Endpoint {
    std::string host;  // numeric IPv4 or IPv6, or "localhost"
    std::uint16_t port = 0;
    [[nodiscard]] std::string uri() const;  // "tcp:HOST:PORT" ([HOST] for IPv6)
};

// "tcp:127.0.0.1:4444", "tcp:[::1]:4444", "tcp:localhost:0". Errors name the part.
[[nodiscard]] Result<Endpoint> parse_uri(std::string_view uri);

[[nodiscard]] Result<Fd> listen_tcp(const Endpoint& at, int backlog = 8);
[[nodiscard]] Result<Endpoint> local_endpoint(int fd);

// Blocks in poll on the listener and `shutdown_fd`; ECANCELED when shut down, ETIMEDOUT
// after `timeout` (negative: none).
[[nodiscard]] Result<Fd> accept_tcp(int listen_fd, int shutdown_fd, std::chrono::milliseconds timeout);

// Connects with a deadline, interruptible through `shutdown_fd`. The socket is blocking
// afterwards; `nodelay` sets TCP_NODELAY (urgent channel).
[[nodiscard]] Result<Fd> connect_tcp(const Endpoint& to, int shutdown_fd,
                                     std::chrono::milliseconds timeout, bool nodelay);

// Sets TCP_NODELAY on an accepted socket.
[[nodiscard]] Result<void> set_nodelay(int fd);

// Every migration socket (connect_tcp and every accept) ends within kDeadPeerAfter of its
// peer going silent, whatever the session waits for: keepalive probes from kProbeIdle of
// silence, every kProbeInterval, kProbeCount unanswered = dead; TCP_USER_TIMEOUT bounds
// data (and a zero window) left unacknowledged as long. The error is ETIMEDOUT (a lost
// link). Post-copy's heartbeats notice sooner; this covers the rest — pre-copy rounds,
// the switchover, a reader with nothing in flight — where a silent partition would
// otherwise last as long as TCP's own retransmissions, or forever on an idle socket.
inline constexpr std::chrono::seconds kProbeIdle{10}, kProbeInterval{5};
inline constexpr int kProbeCount = 4;
inline constexpr std::chrono::seconds kDeadPeerAfter = kProbeIdle + kProbeInterval * kProbeCount;
[[nodiscard]] Result<void> set_liveness(int fd);

// errnos that mean the link broke: the session may pause and recover instead of failing.
[[nodiscard]] bool link_errno(int e) noexcept;
template <class T>
[[nodiscard]] Result<T> classify(Result<T> r) {
    if (!r && link_errno(r.error().code)) r.error().kind = ErrorClass::transport_lost;
    return r;
}

// "10.0.0.1:53022": the peer of a connected socket, for logs ("?" if unknown).
[[nodiscard]] std::string peer_address(int fd);

// An eventfd used to tell a thread to stop: readable once signalled, stays readable.
class ShutdownEvent {
public:
    [[nodiscard]] static Result<ShutdownEvent> create();
    void signal() noexcept;
    [[nodiscard]] bool signalled() const noexcept;
    [[nodiscard]] int fd() const { return fd_.get(); }

private:
    Fd fd_;
};

}  // namespace lazymig::net
