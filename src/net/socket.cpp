#include "src/net/socket.hpp"
#include "src/errors.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <charconv>
#include <cstring>

#include <fmt/format.h>

namespace lazymig::net {

Fd& Fd::operator=(Fd&& o) noexcept {
    if (this != &o) {
        reset();
        fd_ = o.release();
    }
    return *this;
}

void Fd::reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

std::string Endpoint::uri() const {
    if (host.find(':') != std::string::npos) return fmt::format("tcp:[{}]:{}", host, port);
    return fmt::format("tcp:{}:{}", host, port);
}

Result<Endpoint> parse_uri(std::string_view uri) {
    constexpr std::string_view scheme = "tcp:";
    if (!uri.starts_with(scheme))
        return logic_error(fmt::format("uri '{}': expected tcp:HOST:PORT (other transports: rdma: "
                                       "is not built in)", uri));
    std::string_view rest = uri.substr(scheme.size());
    std::string_view host, port;
    if (rest.starts_with('[')) {
        const auto close = rest.find(']');
        if (close == std::string_view::npos || close + 1 >= rest.size() || rest[close + 1] != ':')
            return logic_error(fmt::format("uri '{}': IPv6 host must be written [ADDR]:PORT", uri));
        host = rest.substr(1, close - 1);
        port = rest.substr(close + 2);
    } else {
        const auto colon = rest.rfind(':');
        if (colon == std::string_view::npos)
            return logic_error(fmt::format("uri '{}': missing :PORT", uri));
        host = rest.substr(0, colon);
        port = rest.substr(colon + 1);
    }
    if (host.empty()) return logic_error(fmt::format("uri '{}': empty host", uri));
    unsigned value = 0;
    auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (port.empty() || ec != std::errc{} || p != port.data() + port.size() || value > 65535)
        return logic_error(fmt::format("uri '{}': port '{}' is not a number from 0 to 65535", uri, port));
    return Endpoint{std::string(host == "localhost" ? "127.0.0.1" : host), static_cast<std::uint16_t>(value)};
}

namespace {

struct SockAddr {
    sockaddr_storage storage{};
    socklen_t len = 0;
    int family = AF_INET;
};

Result<SockAddr> resolve(const Endpoint& e) {
    SockAddr a;
    auto* v4 = reinterpret_cast<sockaddr_in*>(&a.storage);
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
    if (::inet_pton(AF_INET, e.host.c_str(), &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(e.port);
        a.len = sizeof *v4;
        a.family = AF_INET;
    } else if (::inet_pton(AF_INET6, e.host.c_str(), &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(e.port);
        a.len = sizeof *v6;
        a.family = AF_INET6;
    } else {
        return logic_error(fmt::format("host '{}' is not a numeric IPv4 or IPv6 address", e.host));
    }
    return a;
}

Result<void> wait_readable(int fd, short events, int shutdown_fd, std::chrono::milliseconds timeout,
                           std::string_view what) {
    pollfd fds[2] = {{fd, events, 0}, {shutdown_fd, POLLIN, 0}};
    const nfds_t n = shutdown_fd >= 0 ? 2 : 1;
    const int ms = timeout.count() < 0 ? -1 : static_cast<int>(timeout.count());
    for (;;) {
        const int r = ::poll(fds, n, ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return LZ_SYS_ERROR("poll while {}", what);
        if (r == 0) return sys_error(fmt::format("{}: no answer within {} ms", what, timeout.count()), ETIMEDOUT);
        if (n == 2 && fds[1].revents) return sys_error(fmt::format("{}: shut down", what), ECANCELED);
        return {};
    }
}

}  // namespace

Result<Fd> listen_tcp(const Endpoint& at, int backlog) {
    auto addr = resolve(at);
    if (!addr) return std::unexpected(addr.error().wrap("listen"));
    Fd fd(::socket(addr->family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return sys_error("socket for listening");
    const int one = 1;
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
        return sys_error("setsockopt SO_REUSEADDR");
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr->storage), addr->len) != 0)
        return LZ_SYS_ERROR("bind {}", at.uri());
    if (::listen(fd.get(), backlog) != 0) return LZ_SYS_ERROR("listen on {}", at.uri());
    return fd;
}

Result<Endpoint> local_endpoint(int fd) {
    sockaddr_storage s{};
    socklen_t len = sizeof s;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&s), &len) != 0) return sys_error("getsockname");
    char buf[INET6_ADDRSTRLEN] = {};
    if (s.ss_family == AF_INET6) {
        auto* v6 = reinterpret_cast<sockaddr_in6*>(&s);
        ::inet_ntop(AF_INET6, &v6->sin6_addr, buf, sizeof buf);
        return Endpoint{buf, ntohs(v6->sin6_port)};
    }
    auto* v4 = reinterpret_cast<sockaddr_in*>(&s);
    ::inet_ntop(AF_INET, &v4->sin_addr, buf, sizeof buf);
    return Endpoint{buf, ntohs(v4->sin_port)};
}

Result<void> set_nodelay(int fd) {
    const int one = 1;
    if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        return sys_error("setsockopt TCP_NODELAY");
    return {};
}

Result<void> set_liveness(int fd) {
    const int one = 1, idle = static_cast<int>(kProbeIdle.count()), interval = static_cast<int>(kProbeInterval.count()),
              count = kProbeCount;
    const unsigned user_timeout = static_cast<unsigned>(std::chrono::milliseconds(kDeadPeerAfter).count());
    if (::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) != 0) return sys_error("setsockopt SO_KEEPALIVE");
    if (::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) != 0) return sys_error("setsockopt TCP_KEEPIDLE");
    if (::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval) != 0)
        return sys_error("setsockopt TCP_KEEPINTVL");
    if (::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count) != 0) return sys_error("setsockopt TCP_KEEPCNT");
    if (::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout) != 0)
        return sys_error("setsockopt TCP_USER_TIMEOUT");
    return {};
}

Result<Fd> accept_tcp(int listen_fd, int shutdown_fd, std::chrono::milliseconds timeout) {
    if (auto w = wait_readable(listen_fd, POLLIN, shutdown_fd, timeout, "waiting for the source to connect"); !w)
        return std::unexpected(w.error());
    Fd fd(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd.valid()) return sys_error("accept");
    if (auto l = set_liveness(fd.get()); !l) return std::unexpected(l.error());
    return fd;
}

Result<Fd> connect_tcp(const Endpoint& to, int shutdown_fd, std::chrono::milliseconds timeout, bool nodelay) {
    auto addr = resolve(to);
    if (!addr) return std::unexpected(addr.error().wrap("connect"));
    Fd fd(::socket(addr->family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) return sys_error("socket for connecting");
    if (nodelay)
        if (auto r = set_nodelay(fd.get()); !r) return std::unexpected(r.error());
    if (auto l = set_liveness(fd.get()); !l) return std::unexpected(l.error());
    const std::string what = fmt::format("connecting to {}", to.uri());
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr->storage), addr->len) != 0) {
        if (errno != EINPROGRESS) return sys_error(what);
        if (auto w = wait_readable(fd.get(), POLLOUT, shutdown_fd, timeout, what); !w)
            return std::unexpected(w.error());
        int err = 0;
        socklen_t len = sizeof err;
        if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) return sys_error("getsockopt SO_ERROR");
        if (err != 0) return sys_error(what, err);
    }
    const int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0)
        return sys_error("fcntl clearing O_NONBLOCK");
    return fd;
}

// The link broke: the session may pause and recover instead of failing (DESIGN.md).
bool link_errno(int e) noexcept {
    switch (e) {
    case ECONNRESET: case EPIPE: case ETIMEDOUT: case ENOTCONN: case ECONNABORTED:
    case EHOSTUNREACH: case ENETUNREACH: case ENETDOWN: case ECONNREFUSED: case EHOSTDOWN:
        return true;
    default:
        return false;
    }
}

std::string peer_address(int fd) {
    sockaddr_storage s{};
    socklen_t len = sizeof s;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&s), &len) != 0) return "?";
    char buf[INET6_ADDRSTRLEN] = {};
    if (s.ss_family == AF_INET6) {
        auto* v6 = reinterpret_cast<sockaddr_in6*>(&s);
        ::inet_ntop(AF_INET6, &v6->sin6_addr, buf, sizeof buf);
        return fmt::format("[{}]:{}", buf, ntohs(v6->sin6_port));
    }
    auto* v4 = reinterpret_cast<sockaddr_in*>(&s);
    ::inet_ntop(AF_INET, &v4->sin_addr, buf, sizeof buf);
    return fmt::format("{}:{}", buf, ntohs(v4->sin_port));
}

Result<ShutdownEvent> ShutdownEvent::create() {
    ShutdownEvent e;
    e.fd_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!e.fd_.valid()) return sys_error("eventfd for shutdown");
    return e;
}

void ShutdownEvent::signal() noexcept {
    const std::uint64_t one = 1;
    // The counter only grows; a failed write (counter overflow) still leaves it readable.
    [[maybe_unused]] auto n = ::write(fd_.get(), &one, sizeof one);
}

bool ShutdownEvent::signalled() const noexcept {
    pollfd p{fd_.get(), POLLIN, 0};
    return ::poll(&p, 1, 0) == 1;
}

}  // namespace lazymig::net
