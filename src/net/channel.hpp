// net/channel.hpp — the transport seam: what a session needs from a link to its peer.
//
// A Transport opens the channels of one migration — urgent, N bulk (and, later,
// replication) — and can open them again after a link loss (recover: a new connect()
// on the same or a new Transport). A Channel moves bytes of frames and page runs; the
// session, the pager and the pusher never see a socket, a ring or a queue pair.
// Implementations: TCP over io_uring (src/net/tcp.cpp); TLS and RDMA plug in here.
//
// Threads. A channel has two directions. Each is used by one thread at a time (the
// receiver; the sender) — a direction may move from one thread to another between
// calls (the handshake on the session thread, then the pusher), never be used by two at
// once. try_send() is the exception on the sending side: it never blocks and is
// serialised by its caller (pager/outbox.hpp).
//
// Every blocking call also ends when the shutdown eventfd given to the Transport fires
// (ECANCELED, class local) and fails with class transport_lost when the link breaks
// (reset, EOF inside a frame, a deadline passed without progress).
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "lazymig/error.hpp"

namespace lazymig::net {

class Channel {
public:
    virtual ~Channel() = default;
    Channel() = default;
    Channel(const Channel&) = delete;
    Channel& operator=(const Channel&) = delete;

    // "urgent channel to tcp:10.0.0.2:4444": the prefix of every error this channel reports.
    [[nodiscard]] virtual const std::string& where() const = 0;

    // ── receiving side ──
    // Up to `len` bytes; 0 at an orderly end of stream.
    [[nodiscard]] virtual Result<std::size_t> recv_some(void* dst, std::size_t len) = 0;
    // Exactly `len` bytes; end of stream first is transport_lost (ECONNRESET).
    [[nodiscard]] virtual Result<void> recv_exact(void* dst, std::size_t len) = 0;

    // ── sending side ──
    // Sends every byte of the gathered vector; returns when the transport took them all.
    [[nodiscard]] virtual Result<void> send(std::span<const iovec> iov) = 0;
    // Pipelined send: starts sending and returns; the bytes must stay untouched until
    // send_finish() returns. At most one send is in flight per channel.
    // REQUIRES: no send in flight.
    [[nodiscard]] virtual Result<void> send_start(std::span<const iovec> iov) = 0;
    // Waits for the send started last to complete (no-op when none is in flight).
    // While a send is in flight, send_finish() is the only sending-side call allowed.
    [[nodiscard]] virtual Result<void> send_finish() = 0;
    // Waits until `deadline` (pacing); ECANCELED on shutdown. REQUIRES: no send in flight.
    [[nodiscard]] virtual Result<void> wait_until(std::chrono::steady_clock::time_point deadline) = 0;

    // Non-blocking: sends what the transport takes now and returns how many bytes that was
    // (0 when it takes none). For a thread whose one blocking place is elsewhere: it
    // polls poll_fd() for POLLOUT when bytes are left over.
    [[nodiscard]] virtual Result<std::size_t> try_send(std::span<const std::byte> bytes) = 0;
    [[nodiscard]] virtual int poll_fd() const = 0;
    // True while bytes try_send() took are still held by the channel (TLS: ciphertext the
    // socket did not take yet); try_send() with no bytes pushes them on.
    [[nodiscard]] virtual bool send_backlog() const { return false; }

    // Bytes received so far (for stats; any thread).
    [[nodiscard]] virtual std::uint64_t bytes_received() const = 0;
    [[nodiscard]] virtual std::uint64_t bytes_sent() const = 0;
};

class Transport {
public:
    virtual ~Transport() = default;
    // "tcp" (later "tls", "rdma"): named in stats and logs.
    [[nodiscard]] virtual std::string_view name() const = 0;
    // Source: opens one more channel to the peer; `what` names it in errors ("bulk channel 2").
    [[nodiscard]] virtual Result<std::unique_ptr<Channel>> connect(std::string what, bool low_latency) = 0;
    // Destination: the next channel the peer opens, within `timeout` (negative: no limit);
    // `what` names it in errors ("urgent channel"). Which channel it really is, the peer's
    // HELLO says.
    [[nodiscard]] virtual Result<std::unique_ptr<Channel>> accept(std::string what, std::chrono::milliseconds timeout,
                                                                  bool low_latency) = 0;
    // Destination: stops accepting (every channel is open); later accept() fails.
    virtual void close_listener() = 0;
    // Destination: the address peers connect to, with the bound port.
    [[nodiscard]] virtual std::string local_uri() const = 0;
    // "userspace" or "kernel" (TLS: where records are encrypted), "none" without TLS.
    [[nodiscard]] virtual std::string_view security() const { return "none"; }
    // Destination: connections closed before they authenticated (any thread).
    [[nodiscard]] virtual std::uint64_t refused() const { return 0; }
};

class Fd;
// A channel over any connected stream socket (TCP, a Unix socketpair), which it owns.
[[nodiscard]] Result<std::unique_ptr<Channel>> stream_channel(Fd fd, std::string where, int shutdown_fd);

class TlsContext;
// TCP over io_uring. `shutdown_fd` ends every wait of every channel it opens. With `tls`
// every channel is TLS 1.3 (net/tls.hpp), authenticated before connect()/accept()
// returns it. The listener runs the handshakes of all who connect at once, each with
// its own deadline; one that fails or stays silent is closed, logged with its address
// and counted (refused()), and accept() goes on waiting for an authenticated peer.
[[nodiscard]] Result<std::unique_ptr<Transport>> tcp_connector(std::string_view uri, int shutdown_fd,
                                                               std::chrono::milliseconds connect_timeout,
                                                               std::shared_ptr<TlsContext> tls = {});
[[nodiscard]] Result<std::unique_ptr<Transport>> tcp_listener(std::string_view uri, int shutdown_fd,
                                                              std::shared_ptr<TlsContext> tls = {});

}  // namespace lazymig::net
