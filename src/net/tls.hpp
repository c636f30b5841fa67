// net/tls.hpp — TLS 1.3 (OpenSSL) on the channel seam: a per-migration pre-shared key
// or x509 certificates, checked before a channel carries a single frame.
//
// Design: OpenSSL never touches the socket. Each connection's SSL object reads and
// writes through a BIO over two staging buffers (ciphertext in, ciphertext out); the
// channel moves those buffers with the same io_uring rings as plain TCP (ring.hpp), so
// the receive and send threads still block in exactly one place each, and shutdown
// still ends every wait. SSL_read/SSL_write only ever compute (they never wait for I/O),
// so the two directions share one SSL object under a mutex held for the crypto alone.
//
// Handshakes are non-blocking state machines (Handshake): the listener runs many at
// once with their own deadlines, so a silent or slow stranger never delays the real
// source; the connecting side runs one with poll and a deadline.
//
// Kernel TLS: probe_ktls() asks the kernel for the "tls" upper-layer protocol. This
// build encrypts in user space either way and says which in stats and logs.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "lazymig/lazymig.hpp"
#include "src/net/channel.hpp"
#include "src/net/socket.hpp"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace lazymig::net {

// Ciphertext staging shared by the BIO and the channel (tls.cpp).
struct TlsIo;

// One SSL_CTX for one side of one migration: its key or certificates, its checks.
class TlsContext {
public:
    // Reads the key or the certificates of `sec` (sec.auth is psk or x509); errors name
    // the file and what is wrong with it.
    [[nodiscard]] static Result<std::shared_ptr<TlsContext>> create(const Security& sec, bool server);
    ~TlsContext();
    TlsContext(const TlsContext&) = delete;
    TlsContext& operator=(const TlsContext&) = delete;

    [[nodiscard]] bool server() const { return server_; }
    [[nodiscard]] Auth auth() const { return sec_.auth; }
    [[nodiscard]] std::chrono::milliseconds handshake_timeout() const { return sec_.handshake_timeout; }
    // "userspace" (or "kernel" once kTLS is used): where records are encrypted.
    [[nodiscard]] std::string_view mode() const { return "userspace"; }

private:
    TlsContext(Security sec, bool server) : sec_(std::move(sec)), server_(server) {}
    friend class Handshake;
    friend struct TlsCallbacks;
    Security sec_;
    bool server_;
    SSL_CTX* ctx_ = nullptr;
};

// The TLS context `sec` asks for, or nullptr for Auth::none (logged as the explicit
// choice it is); an error for Auth::invalid or missing credentials.
[[nodiscard]] Result<std::shared_ptr<TlsContext>> tls_for(const Security& sec, bool server);
// "psk", "x509", "none".
[[nodiscard]] std::string_view to_string(Auth a) noexcept;

// True when the kernel offers kernel TLS (setsockopt TCP_ULP "tls"); `why` says what the
// probe saw. Probed once per process.
[[nodiscard]] bool probe_ktls(std::string* why = nullptr);

// A TLS handshake on one connected socket, driven without blocking.
class Handshake {
public:
    [[nodiscard]] static Result<Handshake> start(std::shared_ptr<TlsContext> ctx, Fd fd, std::string peer,
                                                 std::chrono::steady_clock::time_point deadline);
    Handshake(Handshake&&) noexcept;
    Handshake& operator=(Handshake&&) noexcept;
    ~Handshake();

    // Moves the handshake on with what the socket has now: true once authenticated.
    // An error says why the peer was refused (class peer_violation; transport_lost when
    // it closed).
    [[nodiscard]] Result<bool> step();
    // The poll events step() waits for (POLLIN, or POLLOUT while output is left).
    [[nodiscard]] short events() const;
    [[nodiscard]] int fd() const { return fd_.get(); }
    [[nodiscard]] const std::string& peer() const { return peer_; }
    [[nodiscard]] std::chrono::steady_clock::time_point deadline() const { return deadline_; }
    // After step() returned true: the channel over this connection.
    [[nodiscard]] Result<std::unique_ptr<Channel>> into_channel(std::string where, int shutdown_fd) &&;

    // Runs step() until done, waiting in poll with the deadline and `shutdown_fd`.
    [[nodiscard]] Result<void> run(int shutdown_fd);

private:
    Handshake() = default;
    Result<bool> flush();
    std::shared_ptr<TlsContext> ctx_;
    Fd fd_;
    SSL* ssl_ = nullptr;
    std::unique_ptr<TlsIo> io_;
    std::string peer_;
    std::chrono::steady_clock::time_point deadline_{};
};

}  // namespace lazymig::net
