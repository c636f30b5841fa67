// net/rdma.hpp — RDMA on rdma-core (libibverbs + librdmacm): reliable-connected queue
// pairs whose one user is the destination, which READs guest pages straight out of the
// source's registered memory. No source CPU touches a page on this path.
//
//   auto t = rdma_listener("rdma:192.0.2.1:0", stop);      // destination; TCP control
//   auto l = rdma::Listener::listen(host, stop);           // rdma_cm, ephemeral port
//   auto q = l->accept(check_private_data, deadline);      // one per QP the source opens
//   q->post_reads(wrs, signal_last);  q->wait(); q->poll(wcs);
//
// The rdma: URI names a TCP address for the control channels (urgent, bulk: handshake,
// region table, device state, zero bitmap, sample checksums); the rdma_cm listener
// binds the same host on a port of its own and tells it in RDMA_LISTEN.
//
// Order of acquisition (rc_pingpong's): event channel → cm id → address/route → PD → MR
// → CQ (+ completion channel) → QP → connect; release in reverse, which the member order
// of QueuePair and the shared Domain (PD) give.
//
// Threads: one thread posts and polls a QueuePair at a time; a Listener belongs to the
// thread that accepts. Every wait ends on the shutdown eventfd (ECANCELED) or its
// deadline (ETIMEDOUT), and a DISCONNECTED/error event on the QP's own cm event
// channel ends it with class transport_lost (RDMA has no TCP-style timeout for a peer
// that sent nothing: the control channel's end and these events are what tell).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "lazymig/error.hpp"
#include "src/net/channel.hpp"
#include "src/net/socket.hpp"

struct ibv_pd;
struct ibv_mr;
struct ibv_wc;

namespace lazymig::net {

// rdma:HOST:PORT. The transport's channels are TCP (control), with `tls` authenticated
// like tcp_connector's: the memory-region keys travel only after the handshake.
// name() is "rdma". Without rdma-core at build time both fail and say so.
[[nodiscard]] Result<std::unique_ptr<Transport>> rdma_connector(std::string_view uri, int shutdown_fd,
                                                                std::chrono::milliseconds connect_timeout,
                                                                std::shared_ptr<TlsContext> tls = {});
[[nodiscard]] Result<std::unique_ptr<Transport>> rdma_listener(std::string_view uri, int shutdown_fd,
                                                               std::shared_ptr<TlsContext> tls = {});
[[nodiscard]] bool rdma_built();
[[nodiscard]] inline bool is_rdma_uri(std::string_view uri) { return uri.starts_with("rdma:"); }
// The host of an rdma:HOST:PORT URI (what rdma_cm binds or connects to).
[[nodiscard]] inline Result<std::string> rdma_host(std::string_view uri) {
    if (!is_rdma_uri(uri)) return logic_error("uri '" + std::string(uri) + "': expected rdma:HOST:PORT");
    auto at = parse_uri("tcp:" + std::string(uri.substr(5)));
    if (!at) {  // "uri 'tcp:H': missing :PORT" → said of the rdma: URI
        const auto& c = at.error().context;
        const auto why = c.find("': ");
        return logic_error("uri '" + std::string(uri) + "': " + (why == std::string::npos ? c : c.substr(why + 3)));
    }
    return at->host;
}

namespace rdma {

// Private data of the source's connect requests: "LZRD" | u8 role | u64 session (LE).
enum class Role : std::uint8_t { fault = 1, bulk = 2 };
[[nodiscard]] inline std::array<std::byte, 13> private_data(Role role, std::uint64_t session) {
    std::array<std::byte, 13> p{std::byte{'L'}, std::byte{'Z'}, std::byte{'R'}, std::byte{'D'},
                                std::byte{static_cast<std::uint8_t>(role)}};
    for (int i = 0; i < 8; ++i) p[5 + i] = std::byte(session >> (8 * i) & 0xff);
    return p;
}

// A protection domain, shared by the QPs of one device and the MRs registered in it.
class Domain;

// A registered memory region. Move-only; deregistered by its owner.
class MemoryRegion {
public:
    MemoryRegion() = default;
    MemoryRegion(std::shared_ptr<Domain> d, ibv_mr* mr) : domain_(std::move(d)), mr_(mr) {}
    MemoryRegion(MemoryRegion&& o) noexcept : domain_(std::move(o.domain_)), mr_(std::exchange(o.mr_, nullptr)) {}
    MemoryRegion& operator=(MemoryRegion&& o) noexcept;
    ~MemoryRegion();
    [[nodiscard]] std::uint32_t lkey() const;
    [[nodiscard]] std::uint32_t rkey() const;
    [[nodiscard]] std::uintptr_t addr() const;
    [[nodiscard]] explicit operator bool() const { return mr_ != nullptr; }

private:
    std::shared_ptr<Domain> domain_;  // outlives the MR
    ibv_mr* mr_ = nullptr;
};

// One RDMA READ: `len` bytes from the peer's `remote` (under `rkey`) to local `local`.
struct ReadWr {
    std::uint64_t local = 0;
    std::uint32_t lkey = 0;
    std::uint32_t len = 0;
    std::uint64_t remote = 0;
    std::uint32_t rkey = 0;
};

// One completion, in our words.
struct Completion {
    std::uint64_t wr_id = 0;
    int status = 0;          // ibv_wc_status; 0 = success
    std::string status_text;  // ibv_wc_status_str, with what it usually means
};

class QueuePair {
public:
    virtual ~QueuePair() = default;
    [[nodiscard]] virtual const std::string& where() const = 0;
    [[nodiscard]] virtual const std::shared_ptr<Domain>& domain() const = 0;
    // Posts the reads as one chain; only the last is signalled (RC completes in order,
    // so its completion means every earlier one is done), under `wr_id`. ENOMEM: the send
    // queue has no room (the caller bounds what it has outstanding).
    [[nodiscard]] virtual Result<void> post_reads(std::span<const ReadWr> wrs, std::uint64_t wr_id) = 0;
    // Non-blocking: up to out.size() completions.
    [[nodiscard]] virtual Result<std::size_t> poll(std::span<Completion> out) = 0;
    // Blocks until a completion may be ready, the shutdown eventfd fires (ECANCELED), the
    // peer disconnects (transport_lost), or `timeout` passes (ETIMEDOUT; negative: none).
    [[nodiscard]] virtual Result<void> wait(std::chrono::milliseconds timeout) = 0;
    // Non-blocking: a disconnect or error event on the QP's cm channel → transport_lost.
    [[nodiscard]] virtual Result<void> check_events() = 0;
    // The fd that becomes readable on a cm event (for a thread that polls elsewhere).
    [[nodiscard]] virtual int event_fd() const = 0;
};

// Registers [addr, addr+len) in `d`. `remote_read`: the peer may READ it (source);
// otherwise the local HCA may write it (destination). `on_demand`: ODP, nothing pinned.
[[nodiscard]] Result<MemoryRegion> register_memory(const std::shared_ptr<Domain>& d, void* addr, std::size_t len,
                                                   bool remote_read, bool on_demand, std::string_view what);
// Whether the device behind `d` can serve RC RDMA READ from on-demand-paging MRs.
[[nodiscard]] bool supports_odp_read(const Domain& d);
[[nodiscard]] std::string device_name(const Domain& d);

// Source: connects one RC QP to host:port; `priv` travels in the connect request.
// `domain` null: the first QP makes one (and returns it through domain()).
[[nodiscard]] Result<std::unique_ptr<QueuePair>> connect(const std::string& host, std::uint16_t port,
                                                         std::span<const std::byte> priv,
                                                         std::shared_ptr<Domain> domain, std::string where,
                                                         int shutdown_fd, std::chrono::milliseconds timeout);

class Listener {
public:
    virtual ~Listener() = default;
    [[nodiscard]] virtual std::uint16_t port() const = 0;
    // The next connect request whose private data `accept_it` approves (others are
    // rejected and cost nothing more), as an established QP in `domain` (null: a new one).
    // `send_depth`: work requests the QP may have outstanding.
    [[nodiscard]] virtual Result<std::unique_ptr<QueuePair>> accept(
        const std::function<Result<void>(std::span<const std::byte>)>& accept_it, std::shared_ptr<Domain> domain,
        std::uint32_t send_depth, std::string where, std::chrono::milliseconds timeout) = 0;
};
// Binds host:port (0: ephemeral) in rdma_cm's TCP port space and listens.
[[nodiscard]] Result<std::unique_ptr<Listener>> listen(const std::string& host, std::uint16_t port, int shutdown_fd);

}  // namespace rdma
}  // namespace lazymig::net
