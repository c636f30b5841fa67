// RDMA queue pairs over librdmacm and libibverbs. See rdma.hpp for the model.
#include "src/net/rdma.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <poll.h>
#include <rdma/rdma_cma.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "src/log.hpp"
#include "src/net/socket.hpp"

namespace lazymig::net {

bool rdma_built() { return true; }

namespace rdma {

class Domain {
public:
    Domain(ibv_context* ctx, ibv_pd* pd) : ctx_(ctx), pd_(pd) {}
    ~Domain() {
        if (pd_) ibv_dealloc_pd(pd_);
    }
    Domain(const Domain&) = delete;
    Domain& operator=(const Domain&) = delete;
    ibv_context* ctx() const { return ctx_; }
    ibv_pd* pd() const { return pd_; }

private:
    ibv_context* ctx_;  // owned by librdmacm (one per device per process)
    ibv_pd* pd_;
};

MemoryRegion& MemoryRegion::operator=(MemoryRegion&& o) noexcept {
    if (this != &o) {
        if (mr_) ibv_dereg_mr(mr_);
        mr_ = std::exchange(o.mr_, nullptr);
        domain_ = std::move(o.domain_);
    }
    return *this;
}
MemoryRegion::~MemoryRegion() {
    if (mr_) ibv_dereg_mr(mr_);
}
std::uint32_t MemoryRegion::lkey() const { return mr_->lkey; }
std::uint32_t MemoryRegion::rkey() const { return mr_->rkey; }
std::uintptr_t MemoryRegion::addr() const { return reinterpret_cast<std::uintptr_t>(mr_->addr); }

bool supports_odp_read(const Domain& d) {
    ibv_device_attr_ex attr{};
    if (ibv_query_device_ex(d.ctx(), nullptr, &attr) != 0) return false;
    return (attr.odp_caps.general_caps & IBV_ODP_SUPPORT) && (attr.odp_caps.per_transport_caps.rc_odp_caps & IBV_ODP_SUPPORT_READ);
}

std::string device_name(const Domain& d) { return ibv_get_device_name(d.ctx()->device); }

Result<MemoryRegion> register_memory(const std::shared_ptr<Domain>& d, void* addr, std::size_t len, bool remote_read,
                                     bool on_demand, std::string_view what) {
    int access = remote_read ? IBV_ACCESS_REMOTE_READ : IBV_ACCESS_LOCAL_WRITE;
    if (on_demand) access |= IBV_ACCESS_ON_DEMAND;
    ibv_mr* mr = ibv_reg_mr(d->pd(), addr, len, access);
    if (!mr) {
        const int e = errno;
        return sys_error(fmt::format("rdma: ibv_reg_mr of {} ({} bytes at {}{}) on {}", what, len, addr,
                                     on_demand ? ", on demand" : "", device_name(*d)),
                         e);
    }
    return MemoryRegion(d, mr);
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::uint32_t kCqDepth = 1024;
constexpr std::uint8_t kMaxReadsInFlight = 16;  // initiator depth / responder resources asked

// One cm event, acknowledged when it goes out of scope.
struct CmEvent {
    rdma_cm_event* ev = nullptr;
    ~CmEvent() { ack(); }
    void ack() {
        if (ev) rdma_ack_cm_event(std::exchange(ev, nullptr));
    }
};

Result<void> set_nonblocking(int fd, std::string_view what) {
    const int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return sys_error(fmt::format("rdma: fcntl O_NONBLOCK on {}", what));
    return {};
}

int ms_left(Clock::time_point deadline, bool unlimited) {
    if (unlimited) return -1;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return static_cast<int>(std::max<long long>(0, left));
}

// Waits for the next event on `ec` (or the shutdown eventfd, or the deadline).
Result<void> next_event(rdma_event_channel* ec, CmEvent& out, int shutdown_fd, Clock::time_point deadline,
                        bool unlimited, std::string_view where) {
    for (;;) {
        if (rdma_get_cm_event(ec, &out.ev) == 0) return {};
        if (errno != EAGAIN && errno != EINTR) return sys_error(fmt::format("{}: rdma_get_cm_event", where));
        pollfd fds[2] = {{ec->fd, POLLIN, 0}, {shutdown_fd, POLLIN, 0}};
        const int n = ::poll(fds, 2, ms_left(deadline, unlimited));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return sys_error(fmt::format("{}: poll on the rdma_cm event channel", where));
        if (fds[1].revents) return std::unexpected(Error{ECANCELED, fmt::format("{}: shut down", where)});
        if (n == 0) return transport_error(fmt::format("{}: no rdma_cm event within the deadline", where), ETIMEDOUT);
    }
}

// Waits for event `want` on `id`; any other event on it is an error that names both.
Result<void> expect_event(rdma_event_channel* ec, rdma_cm_id* id, rdma_cm_event_type want, int shutdown_fd,
                          Clock::time_point deadline, std::string_view where) {
    CmEvent ev;
    if (auto r = next_event(ec, ev, shutdown_fd, deadline, false, where); !r) return r;
    if (ev.ev->event == want && ev.ev->id == id) {
        if (ev.ev->status != 0)
            return transport_error(fmt::format("{}: {} with status {}", where, rdma_event_str(want), ev.ev->status),
                                   ECONNREFUSED);
        return {};
    }
    const int status = ev.ev->status;
    const auto got = ev.ev->event;
    const int code = got == RDMA_CM_EVENT_REJECTED ? ECONNREFUSED
                   : got == RDMA_CM_EVENT_UNREACHABLE || got == RDMA_CM_EVENT_ADDR_ERROR || got == RDMA_CM_EVENT_ROUTE_ERROR
                       ? EHOSTUNREACH
                       : ECONNRESET;
    return transport_error(fmt::format("{}: waiting for {}, rdma_cm reported {} (status {})", where,
                                       rdma_event_str(want), rdma_event_str(got), status),
                           code);
}

Result<sockaddr_storage> socket_address(const std::string& host, std::uint16_t port) {
    sockaddr_storage ss{};
    auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
    if (::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
    } else if (::inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
    } else {
        return logic_error(fmt::format("rdma: host '{}' is not a numeric IPv4 or IPv6 address", host));
    }
    return ss;
}

std::string wc_text(ibv_wc_status s) {
    std::string t = ibv_wc_status_str(s);
    switch (s) {
    case IBV_WC_REM_ACCESS_ERR: return t + " (the peer refused the access: wrong rkey, address or length)";
    case IBV_WC_RETRY_EXC_ERR: return t + " (the peer stopped answering)";
    case IBV_WC_WR_FLUSH_ERR: return t + " (flushed: the queue pair failed before)";
    default: return t;
    }
}

class RcQueuePair final : public QueuePair {
public:
    RcQueuePair(std::string where, int shutdown_fd) : where_(std::move(where)), shutdown_fd_(shutdown_fd) {}
    ~RcQueuePair() override {
        if (id_ && id_->qp) {
            rdma_disconnect(id_);
            rdma_destroy_qp(id_);
        }
        if (cq_) {
            if (unacked_) ibv_ack_cq_events(cq_, unacked_);
            ibv_destroy_cq(cq_);
        }
        if (cc_) ibv_destroy_comp_channel(cc_);
        domain_.reset();
        if (id_) rdma_destroy_id(id_);
        if (ec_) rdma_destroy_event_channel(ec_);
    }

    const std::string& where() const override { return where_; }
    const std::shared_ptr<Domain>& domain() const override { return domain_; }
    int event_fd() const override { return ec_->fd; }

    // Makes the PD (unless given), CQ and QP on `id`, whose events arrive on `ec`.
    Result<void> build(rdma_event_channel* ec, rdma_cm_id* id, std::shared_ptr<Domain> domain, std::uint32_t depth) {
        ec_ = ec;
        id_ = id;
        if (!domain) {
            ibv_pd* pd = ibv_alloc_pd(id->verbs);
            if (!pd) return sys_error(fmt::format("{}: ibv_alloc_pd", where_));
            domain = std::make_shared<Domain>(id->verbs, pd);
        } else if (domain->ctx() != id->verbs) {
            return logic_error(fmt::format("{}: the queue pair's device is not the one the others use", where_));
        }
        domain_ = std::move(domain);
        if (!(cc_ = ibv_create_comp_channel(id->verbs))) return sys_error(fmt::format("{}: ibv_create_comp_channel", where_));
        if (auto r = set_nonblocking(cc_->fd, "the completion channel"); !r) return r;
        if (!(cq_ = ibv_create_cq(id->verbs, static_cast<int>(std::max(depth, kCqDepth)), nullptr, cc_, 0)))
            return sys_error(fmt::format("{}: ibv_create_cq", where_));
        if (ibv_req_notify_cq(cq_, 0) != 0) return sys_error(fmt::format("{}: ibv_req_notify_cq", where_));
        ibv_qp_init_attr attr{};
        attr.send_cq = cq_;
        attr.recv_cq = cq_;
        attr.qp_type = IBV_QPT_RC;
        attr.sq_sig_all = 0;  // selective signalling: only the last read of a chain
        attr.cap.max_send_wr = depth;
        attr.cap.max_recv_wr = 1;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        if (rdma_create_qp(id, domain_->pd(), &attr) != 0) return sys_error(fmt::format("{}: rdma_create_qp", where_));
        return {};
    }

    rdma_conn_param conn_param(std::span<const std::byte> priv) const {
        ibv_device_attr attr{};
        rdma_conn_param p{};
        const bool have = ibv_query_device(id_->verbs, &attr) == 0;
        p.responder_resources = static_cast<std::uint8_t>(have ? std::min<int>(attr.max_qp_rd_atom, kMaxReadsInFlight) : 1);
        p.initiator_depth = static_cast<std::uint8_t>(have ? std::min<int>(attr.max_qp_init_rd_atom, kMaxReadsInFlight) : 1);
        p.retry_count = 7;
        p.rnr_retry_count = 7;
        p.private_data = priv.data();
        p.private_data_len = static_cast<std::uint8_t>(priv.size());
        return p;
    }

    Result<void> post_reads(std::span<const ReadWr> wrs, std::uint64_t wr_id) override {
        if (wrs.empty()) return {};
        constexpr std::size_t kChain = 64;
        std::array<ibv_sge, kChain> sge;
        std::array<ibv_send_wr, kChain> wr;
        // Chains of at most kChain, each one post; only the very last is signalled.
        for (std::size_t at = 0; at < wrs.size(); at += kChain) {
            const std::size_t n = std::min(kChain, wrs.size() - at);
            for (std::size_t i = 0; i < n; ++i) {
                const auto& w = wrs[at + i];
                sge[i] = ibv_sge{w.local, w.len, w.lkey};
                wr[i] = ibv_send_wr{};
                wr[i].wr_id = wr_id;
                wr[i].sg_list = &sge[i];
                wr[i].num_sge = 1;
                wr[i].opcode = IBV_WR_RDMA_READ;
                wr[i].wr.rdma.remote_addr = w.remote;
                wr[i].wr.rdma.rkey = w.rkey;
                wr[i].next = i + 1 < n ? &wr[i + 1] : nullptr;
            }
            if (at + n == wrs.size()) wr[n - 1].send_flags = IBV_SEND_SIGNALED;
            ibv_send_wr* bad = nullptr;
            if (int e = ibv_post_send(id_->qp, wr.data(), &bad); e != 0)
                return sys_error(fmt::format("{}: ibv_post_send of {} RDMA READs", where_, n), e);
        }
        return {};
    }

    Result<std::size_t> poll(std::span<Completion> out) override {
        std::array<ibv_wc, 32> wc;
        const int n = ibv_poll_cq(cq_, static_cast<int>(std::min(out.size(), wc.size())), wc.data());
        if (n < 0) return sys_error(fmt::format("{}: ibv_poll_cq", where_), EIO);
        for (int i = 0; i < n; ++i)
            out[i] = Completion{wc[i].wr_id, wc[i].status, wc[i].status == IBV_WC_SUCCESS ? "" : wc_text(wc[i].status)};
        return static_cast<std::size_t>(n);
    }

    Result<void> wait(std::chrono::milliseconds timeout) override {
        // Armed by the previous event (or at creation); a completion that arrived since
        // is found by the caller's poll before it waits again.
        pollfd fds[3] = {{cc_->fd, POLLIN, 0}, {ec_->fd, POLLIN, 0}, {shutdown_fd_, POLLIN, 0}};
        int n;
        do n = ::poll(fds, 3, timeout.count() < 0 ? -1 : static_cast<int>(timeout.count()));
        while (n < 0 && errno == EINTR);
        if (n < 0) return sys_error(fmt::format("{}: poll on the completion channel", where_));
        if (fds[2].revents) return std::unexpected(Error{ECANCELED, fmt::format("{}: shut down", where_)});
        if (fds[1].revents)
            if (auto r = check_events(); !r) return r;
        if (n == 0) return transport_error(fmt::format("{}: no RDMA completion within {} ms", where_, timeout.count()), ETIMEDOUT);
        if (fds[0].revents) {
            ibv_cq* cq = nullptr;
            void* ctx = nullptr;
            if (ibv_get_cq_event(cc_, &cq, &ctx) == 0) {
                // Acked in batches: each ack takes a lock; destroy_cq needs them all.
                if (++unacked_ == 64) {
                    ibv_ack_cq_events(cq_, unacked_);
                    unacked_ = 0;
                }
            } else if (errno != EAGAIN) {
                return sys_error(fmt::format("{}: ibv_get_cq_event", where_));
            }
            if (ibv_req_notify_cq(cq_, 0) != 0) return sys_error(fmt::format("{}: ibv_req_notify_cq", where_));
        }
        return {};
    }

    Result<void> check_events() override {
        CmEvent ev;
        if (rdma_get_cm_event(ec_, &ev.ev) != 0) {
            if (errno == EAGAIN || errno == EINTR) return {};
            return sys_error(fmt::format("{}: rdma_get_cm_event", where_));
        }
        const auto e = ev.ev->event;
        LZ_LOG(info, "rdma_cm_event", "where=\"{}\" event={}", where_, rdma_event_str(e));
        if (e == RDMA_CM_EVENT_DISCONNECTED || e == RDMA_CM_EVENT_DEVICE_REMOVAL || e == RDMA_CM_EVENT_TIMEWAIT_EXIT ||
            e == RDMA_CM_EVENT_ADDR_CHANGE)
            return transport_error(fmt::format("{}: the peer is gone (rdma_cm: {})", where_, rdma_event_str(e)), ECONNRESET);
        return {};
    }

    rdma_cm_id* id() const { return id_; }

private:
    std::string where_;
    int shutdown_fd_;
    rdma_event_channel* ec_ = nullptr;
    rdma_cm_id* id_ = nullptr;
    std::shared_ptr<Domain> domain_;
    ibv_comp_channel* cc_ = nullptr;
    ibv_cq* cq_ = nullptr;
    unsigned unacked_ = 0;
};

Result<rdma_event_channel*> make_channel(std::string_view where) {
    rdma_event_channel* ec = rdma_create_event_channel();
    if (!ec) return sys_error(fmt::format("{}: rdma_create_event_channel", where));
    if (auto r = set_nonblocking(ec->fd, "the rdma_cm event channel"); !r) {
        rdma_destroy_event_channel(ec);
        return std::unexpected(r.error());
    }
    return ec;
}

// An event channel and an RC (RDMA_PS_TCP) cm id on it; on failure neither is left.
Result<std::pair<rdma_event_channel*, rdma_cm_id*>> make_cm_id(std::string_view where) {
    auto ec = make_channel(where);
    if (!ec) return std::unexpected(ec.error());
    rdma_cm_id* id = nullptr;
    if (rdma_create_id(*ec, &id, nullptr, RDMA_PS_TCP) != 0) {
        const int e = errno;
        rdma_destroy_event_channel(*ec);
        return sys_error(fmt::format("{}: rdma_create_id", where), e);
    }
    return std::pair{*ec, id};
}

class CmListener final : public Listener {
public:
    CmListener(rdma_event_channel* ec, rdma_cm_id* id, int shutdown_fd) : ec_(ec), id_(id), shutdown_fd_(shutdown_fd) {}
    ~CmListener() override {
        rdma_destroy_id(id_);
        rdma_destroy_event_channel(ec_);
    }
    std::uint16_t port() const override { return ntohs(rdma_get_src_port(id_)); }

    Result<std::unique_ptr<QueuePair>> accept(const std::function<Result<void>(std::span<const std::byte>)>& accept_it,
                                              std::shared_ptr<Domain> domain, std::uint32_t send_depth,
                                              std::string where, std::chrono::milliseconds timeout) override {
        const auto deadline = Clock::now() + timeout;
        for (;;) {
            CmEvent ev;
            if (auto r = next_event(ec_, ev, shutdown_fd_, deadline, timeout.count() < 0, where); !r)
                return std::unexpected(r.error());
            if (ev.ev->event != RDMA_CM_EVENT_CONNECT_REQUEST) {
                LZ_LOG(debug, "rdma_listener_event", "event={}", rdma_event_str(ev.ev->event));
                continue;
            }
            rdma_cm_id* child = ev.ev->id;
            const auto& conn = ev.ev->param.conn;
            auto ok = accept_it(std::span(static_cast<const std::byte*>(conn.private_data), conn.private_data_len));
            if (!ok) {
                // A stranger costs one reject; the real peer's request is still to come.
                LZ_LOG(warn, "rdma_connect_refused", "{}", ok.error().message());
                rdma_reject(child, nullptr, 0);
                continue;  // the id is destroyed by rdma_cm once the event is acked
            }
            auto qp = std::make_unique<RcQueuePair>(where, shutdown_fd_);
            auto own = make_channel(where);
            if (!own) return std::unexpected(own.error());
            // The child's events arrive on the listener's channel until migrated.
            if (auto b = qp->build(*own, child, std::move(domain), send_depth); !b) {
                rdma_reject(child, nullptr, 0);
                return std::unexpected(b.error());
            }
            auto param = qp->conn_param({});
            param.responder_resources = std::min(param.responder_resources, conn.initiator_depth);
            param.initiator_depth = std::min(param.initiator_depth, conn.responder_resources);
            if (rdma_accept(child, &param) != 0) return sys_error(fmt::format("{}: rdma_accept", where));
            ev.ack();
            if (auto r = expect_event(ec_, child, RDMA_CM_EVENT_ESTABLISHED, shutdown_fd_, deadline, where); !r)
                return std::unexpected(r.error());
            if (rdma_migrate_id(child, *own) != 0) return sys_error(fmt::format("{}: rdma_migrate_id", where));
            return qp;
        }
    }

private:
    rdma_event_channel* ec_;
    rdma_cm_id* id_;
    int shutdown_fd_;
};

}  // namespace

Result<std::unique_ptr<QueuePair>> connect(const std::string& host, std::uint16_t port, std::span<const std::byte> priv,
                                           std::shared_ptr<Domain> domain, std::string where, int shutdown_fd,
                                           std::chrono::milliseconds timeout) {
    auto to = socket_address(host, port);
    if (!to) return std::unexpected(to.error().wrap(where));
    auto cm = make_cm_id(where);
    if (!cm) return std::unexpected(cm.error());
    rdma_event_channel* ec = cm->first;
    rdma_cm_id* id = cm->second;
    auto qp = std::make_unique<RcQueuePair>(where, shutdown_fd);
    const auto deadline = Clock::now() + timeout;
    const int ms = static_cast<int>(std::clamp<long long>(timeout.count(), 100, 60'000));
    // Owned by qp from here, whatever fails next.
    if (auto b = [&]() -> Result<void> {
            if (rdma_resolve_addr(id, nullptr, reinterpret_cast<sockaddr*>(&*to), ms) != 0)
                return sys_error(fmt::format("{}: rdma_resolve_addr", where));
            if (auto r = expect_event(ec, id, RDMA_CM_EVENT_ADDR_RESOLVED, shutdown_fd, deadline, where); !r) return r;
            if (rdma_resolve_route(id, ms) != 0) return sys_error(fmt::format("{}: rdma_resolve_route", where));
            return expect_event(ec, id, RDMA_CM_EVENT_ROUTE_RESOLVED, shutdown_fd, deadline, where);
        }();
        !b) {
        rdma_destroy_id(id);
        rdma_destroy_event_channel(ec);
        return std::unexpected(b.error());
    }
    if (auto b = qp->build(ec, id, std::move(domain), 4); !b) return std::unexpected(b.error());
    auto param = qp->conn_param(priv);
    if (rdma_connect(id, &param) != 0) return sys_error(fmt::format("{}: rdma_connect", where));
    if (auto r = expect_event(ec, id, RDMA_CM_EVENT_ESTABLISHED, shutdown_fd, deadline, where); !r)
        return std::unexpected(r.error());
    LZ_LOG(info, "rdma_connected", "where=\"{}\" device={}", where, device_name(*qp->domain()));
    return qp;
}

Result<std::unique_ptr<Listener>> listen(const std::string& host, std::uint16_t port, int shutdown_fd) {
    const std::string where = fmt::format("rdma listener on {}:{}", host, port);
    auto at = socket_address(host, port);
    if (!at) return std::unexpected(at.error().wrap(where));
    auto cm = make_cm_id(where);
    if (!cm) return std::unexpected(cm.error());
    rdma_event_channel* ec = cm->first;
    rdma_cm_id* id = cm->second;
    auto l = std::make_unique<CmListener>(ec, id, shutdown_fd);
    if (rdma_bind_addr(id, reinterpret_cast<sockaddr*>(&*at)) != 0)
        return sys_error(fmt::format("{}: rdma_bind_addr (is there an RDMA device with this address?)", where));
    if (rdma_listen(id, 8) != 0) return sys_error(fmt::format("{}: rdma_listen", where));
    const bool wildcard = host == "0.0.0.0" || host == "::";
    if (!id->verbs && !wildcard)
        return sys_error(fmt::format("{}: no RDMA device has this address (bind to the RDMA netdev's own address)", where),
                         ENODEV);
    return l;
}

}  // namespace rdma

namespace {

// The control channels are TCP on the same host:port; the data goes by RDMA READ.
class RdmaTransport final : public Transport {
public:
    RdmaTransport(std::unique_ptr<Transport> tcp, std::string uri) : tcp_(std::move(tcp)), uri_(std::move(uri)) {}
    std::string_view name() const override { return "rdma"; }
    Result<std::unique_ptr<Channel>> connect(std::string what, bool low_latency) override {
        return tcp_->connect(std::move(what), low_latency);
    }
    Result<std::unique_ptr<Channel>> accept(std::string what, std::chrono::milliseconds timeout, bool low_latency) override {
        return tcp_->accept(std::move(what), timeout, low_latency);
    }
    void close_listener() override { tcp_->close_listener(); }
    std::string local_uri() const override { return uri_; }
    std::string_view security() const override { return tcp_->security(); }
    std::uint64_t refused() const override { return tcp_->refused(); }

private:
    std::unique_ptr<Transport> tcp_;
    std::string uri_;
};

Result<std::string> tcp_uri_of(std::string_view uri) {
    if (auto host = rdma_host(uri); !host) return std::unexpected(host.error());
    return "tcp:" + std::string(uri.substr(5));
}

}  // namespace

Result<std::unique_ptr<Transport>> rdma_connector(std::string_view uri, int shutdown_fd,
                                                  std::chrono::milliseconds connect_timeout,
                                                  std::shared_ptr<TlsContext> tls) {
    auto tcp = tcp_uri_of(uri);
    if (!tcp) return std::unexpected(tcp.error());
    auto t = tcp_connector(*tcp, shutdown_fd, connect_timeout, std::move(tls));
    if (!t) return std::unexpected(t.error());
    return std::make_unique<RdmaTransport>(std::move(*t), std::string(uri));
}

Result<std::unique_ptr<Transport>> rdma_listener(std::string_view uri, int shutdown_fd,
                                                 std::shared_ptr<TlsContext> tls) {
    auto tcp = tcp_uri_of(uri);
    if (!tcp) return std::unexpected(tcp.error());
    auto t = tcp_listener(*tcp, shutdown_fd, std::move(tls));
    if (!t) return std::unexpected(t.error());
    const std::string local = "rdma:" + (*t)->local_uri().substr(4);
    return std::make_unique<RdmaTransport>(std::move(*t), local);
}

}  // namespace lazymig::net
