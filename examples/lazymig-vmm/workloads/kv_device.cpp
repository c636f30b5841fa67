#include "kv_device.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "../log.hpp"

namespace vmm {

namespace {
// A non-blocking listener on 127.0.0.1:port (0: the kernel picks).
lazymig::Result<UniqueFd> bind_listener(std::uint16_t port) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) return lazymig::sys_error("kv: socket");
    const int one = 1;
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
        return lazymig::sys_error("kv: setsockopt SO_REUSEADDR");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
        return lazymig::sys_error(fmt::format("kv: bind 127.0.0.1:{}", port));
    if (::listen(fd.get(), 64) != 0) return lazymig::sys_error("kv: listen");
    return fd;
}
}  // namespace

lazymig::Result<std::unique_ptr<KvDevice>> KvDevice::start(std::uint16_t port, VcpuGate& gate) {
    std::unique_ptr<KvDevice> d(new KvDevice(gate));
    auto l = bind_listener(port);
    if (!l) return std::unexpected(l.error());
    d->listen_ = std::move(*l);
    sockaddr_in addr{};
    socklen_t len = sizeof addr;
    if (::getsockname(d->listen_.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
        return lazymig::sys_error("kv: getsockname");
    d->port_ = ntohs(addr.sin_port);
    auto wake = EventFd::create();
    auto stop = EventFd::create();
    if (!wake) return std::unexpected(wake.error().wrap("kv"));
    if (!stop) return std::unexpected(stop.error().wrap("kv"));
    d->wake_ = std::move(*wake);
    d->stop_ = std::move(*stop);
    try {
        d->thread_ = std::thread([dev = d.get()] { dev->run(); });
    } catch (const std::system_error& e) {
        return lazymig::sys_error("kv: starting the service thread", e.code().value());
    }
    log_event("kv_listening", "port={}", d->port_);
    return d;
}

KvDevice::~KvDevice() {
    if (thread_.joinable()) {
        stop_.signal();
        thread_.join();
    }
}

bool KvDevice::next(VcpuGate& gate, Request& out) {
    return gate.wait_work([&] {
        if (queue_.empty()) return false;
        out = std::move(queue_.front());
        queue_.pop_front();
        return true;
    });
}

void KvDevice::respond(const Request& req, std::string line, std::uint64_t epoch) {
    {
        std::lock_guard lock(resp_mu_);
        responses_.push_back({req.conn, req.gen, std::move(line), epoch});
    }
    wake_.signal();
}

void KvDevice::release(std::uint64_t epoch) {
    std::uint64_t was = committed_.load();
    while (was < epoch && !committed_.compare_exchange_weak(was, epoch)) {}
    log_event("kv_output_released", "epoch={}", epoch);
    wake_.signal();
}

void KvDevice::requeue(Request req) {
    gate_.interrupt([&] { queue_.push_front(std::move(req)); });
}

void KvDevice::drop_clients() {
    {
        std::lock_guard lock(listen_mu_);
        if (listen_state_ != Listen::serving) return;
        listen_state_ = Listen::drop_asked;
    }
    wake_.signal();
}

lazymig::Result<void> KvDevice::serve_again() {
    {
        std::lock_guard lock(listen_mu_);
        switch (listen_state_) {
        case Listen::serving: return {};
        case Listen::drop_asked:  // the I/O thread has not dropped anything yet: it need not
            listen_state_ = Listen::serving;
            return {};
        case Listen::dropped: break;
        }
        auto l = bind_listener(port_);
        if (!l) return std::unexpected(l.error().wrap("kv: serving again"));
        relisten_ = std::move(*l);
        listen_state_ = Listen::serving;
    }
    log_event("kv_listening", "port={} reason=resumed-here", port_);
    wake_.signal();
    return {};
}

// I/O thread: does what drop_clients()/serve_again() asked.
void KvDevice::apply_listen_state() {
    std::lock_guard lock(listen_mu_);
    if (listen_state_ == Listen::drop_asked) {
        for (std::uint32_t c = 0; c < kMaxConns; ++c)
            if (conns_[c].fd) close_conn(c, "the VM migrated away");
        listen_.reset();
        listen_state_ = Listen::dropped;
        log_event("kv_closed", "reason=migrated");
    } else if (listen_state_ == Listen::serving && relisten_) {
        listen_ = std::move(relisten_);
    }
}

nlohmann::json KvDevice::status() const {
    bool serving;
    {
        std::lock_guard lock(listen_mu_);
        serving = listen_state_ == Listen::serving;
    }
    return {{"port", port_}, {"connections", open_conns_.load()}, {"served", served_.load()},
            {"serving", serving}, {"acks_held", held_total_.load()}, {"committed_epoch", committed_.load()}};
}

void KvDevice::run() {
    std::vector<pollfd> fds;
    std::vector<std::uint32_t> owner;  // fds[i] belongs to conns_[owner[i]] from index 3
    for (;;) {
        fds.assign({{stop_.fd(), POLLIN, 0}, {wake_.fd(), POLLIN, 0}, {listen_.get(), POLLIN, 0}});
        if (!listen_ || open_conns_ == kMaxConns) fds[2].fd = -1;  // poll ignores negative fds
        owner.clear();
        for (std::uint32_t c = 0; c < kMaxConns; ++c) {
            Conn& k = conns_[c];
            if (!k.fd) continue;
            const short ev = static_cast<short>((k.busy ? 0 : POLLIN) | (k.out.empty() ? 0 : POLLOUT));
            fds.push_back({k.fd.get(), ev, 0});
            owner.push_back(c);
        }
        if (::poll(fds.data(), fds.size(), -1) < 0) {
            if (errno == EINTR) continue;
            log_event("kv_error", "poll: {} (errno {})", std::strerror(errno), errno);
            return;
        }
        if (fds[0].revents) return;
        if (fds[1].revents) {
            wake_.drain();
            deliver_responses();
            const int was = listen_.get();
            apply_listen_state();
            if (listen_.get() != was) continue;  // the fds gathered above may be closed
        }
        if (fds[2].revents) accept_one();
        for (std::size_t i = 3; i < fds.size(); ++i) {
            const std::uint32_t c = owner[i - 3];
            if (!conns_[c].fd || conns_[c].fd.get() != fds[i].fd) continue;
            if (fds[i].revents & POLLOUT) flush(c);
            if (conns_[c].fd && (fds[i].revents & (POLLIN | POLLHUP | POLLERR))) read_from(c);
        }
    }
}

void KvDevice::accept_one() {
    UniqueFd fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
        if (errno != EAGAIN && errno != ECONNABORTED)
            log_event("kv_error", "accept4: {} (errno {})", std::strerror(errno), errno);
        return;
    }
    for (std::uint32_t c = 0; c < kMaxConns; ++c) {
        if (conns_[c].fd) continue;
        conns_[c].fd = std::move(fd);
        conns_[c].in.clear();
        conns_[c].out.clear();
        conns_[c].busy = false;
        ++open_conns_;
        return;
    }
    // Not reached: the listener is not polled while every slot is taken.
}

void KvDevice::read_from(std::uint32_t c) {
    Conn& k = conns_[c];
    char buf[4096];
    const ssize_t n = ::recv(k.fd.get(), buf, sizeof buf, 0);
    if (n == 0) return close_conn(c, "");
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        close_conn(c, errno == ECONNRESET ? "" : fmt::format("recv: {} (errno {})", std::strerror(errno), errno));
        return;
    }
    k.in.append(buf, static_cast<std::size_t>(n));
    dispatch(c);
}

// Hands the connection's next complete line to a vCPU, if none is in flight.
void KvDevice::dispatch(std::uint32_t c) {
    Conn& k = conns_[c];
    if (k.busy || !k.fd) return;
    const auto nl = k.in.find('\n');
    if (nl == std::string::npos) {
        if (k.in.size() > kMaxLine) {
            k.out += fmt::format("ERR line longer than {} bytes\n", kMaxLine);
            flush(c);
            close_conn(c, "line too long");
        }
        return;
    }
    Request req{c, k.gen, k.in.substr(0, std::min(nl, kMaxLine + 1))};
    k.in.erase(0, nl + 1);
    if (req.line.size() > kMaxLine) {
        k.out += fmt::format("ERR line longer than {} bytes\n", kMaxLine);
        flush(c);
        return dispatch(c);
    }
    k.busy = true;
    gate_.interrupt([&] { queue_.push_back(std::move(req)); });
}

void KvDevice::deliver_responses() {
    std::vector<Response> ready;
    {
        std::lock_guard lock(resp_mu_);
        ready.swap(responses_);
    }
    // Output commit: an ack whose epoch the source has not committed waits in held_ (one
    // per connection at most: each has one request in flight).
    const std::uint64_t committed = committed_.load();
    std::vector<Response> go, still;
    for (auto& r : held_) (r.epoch <= committed ? go : still).push_back(std::move(r));
    for (auto& r : ready) {
        if (r.epoch > committed) {
            held_total_.fetch_add(1, std::memory_order_relaxed);
            still.push_back(std::move(r));
        } else {
            go.push_back(std::move(r));
        }
    }
    held_.swap(still);
    for (auto& r : go) {
        Conn& k = conns_[r.conn];
        if (!k.fd || k.gen != r.gen) continue;  // the client left; its request still ran
        k.out += r.line;
        k.out += '\n';
        k.busy = false;
        ++served_;
        flush(r.conn);
        dispatch(r.conn);
    }
}

void KvDevice::flush(std::uint32_t c) {
    Conn& k = conns_[c];
    while (k.fd && !k.out.empty()) {
        const ssize_t n = ::send(k.fd.get(), k.out.data(), k.out.size(), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN)
                close_conn(c, errno == EPIPE || errno == ECONNRESET
                                  ? "" : fmt::format("send: {} (errno {})", std::strerror(errno), errno));
            return;
        }
        k.out.erase(0, static_cast<std::size_t>(n));
    }
}

void KvDevice::close_conn(std::uint32_t c, std::string_view why) {
    Conn& k = conns_[c];
    if (!k.fd) return;
    if (!why.empty()) log_event("kv_client_closed", "slot={} reason=\"{}\"", c, why);
    k.fd.reset();
    k.in.clear();
    k.out.clear();
    k.busy = false;
    ++k.gen;
    --open_conns_;
}

}  // namespace vmm
