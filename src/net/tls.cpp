#include "src/net/tls.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include <fmt/format.h>

#include "src/errors.hpp"
#include "src/log.hpp"
#include "src/net/ring.hpp"

#ifndef TCP_ULP
#define TCP_ULP 31
#endif

namespace lazymig::net {

// Ciphertext staging. rx[head, tail) is received and not yet read by OpenSSL; tx is what
// OpenSSL wrote and no one has taken to send yet.
struct TlsIo {
    std::vector<std::byte> rx;
    std::size_t head = 0, tail = 0;
    std::vector<std::byte> tx;
    bool eof = false;

    // Room at the end of rx for the next receive.
    void compact() {
        if (head == tail) head = tail = 0;
        else if (tail == rx.size() && head > 0) {
            std::memmove(rx.data(), rx.data() + head, tail - head);
            tail -= head;
            head = 0;
        }
    }
};

namespace {

// A handshake record is at most 16 KiB plus its header and tag: this much is all a
// stranger can make the listener hold before it authenticated.
constexpr std::size_t kHandshakeBuffer = 18 * 1024;
// After authentication: ciphertext is received a MiB at a time (FLOORS.md: receive in MiB).
constexpr std::size_t kChannelBuffer = 1u << 20;

// Everything OpenSSL queued about the last failure, in one line.
std::string ssl_reason() {
    std::string out;
    while (unsigned long e = ERR_get_error()) {
        char buf[256];
        ERR_error_string_n(e, buf, sizeof buf);
        if (!out.empty()) out += "; ";
        out += buf;
    }
    return out.empty() ? "no reason given" : out;
}

// ─── the BIO over TlsIo ─────────────────────────────────────────────────────────────
int bio_read(BIO* b, char* out, size_t len, size_t* got) {
    auto* io = static_cast<TlsIo*>(BIO_get_data(b));
    BIO_clear_retry_flags(b);
    const std::size_t have = io->tail - io->head;
    if (have == 0) {
        if (!io->eof) BIO_set_retry_read(b);
        *got = 0;
        return 0;
    }
    const std::size_t n = std::min(have, len);
    std::memcpy(out, io->rx.data() + io->head, n);
    io->head += n;
    *got = n;
    return 1;
}
int bio_write(BIO* b, const char* in, size_t len, size_t* put) {
    auto* io = static_cast<TlsIo*>(BIO_get_data(b));
    BIO_clear_retry_flags(b);
    const auto* p = reinterpret_cast<const std::byte*>(in);
    io->tx.insert(io->tx.end(), p, p + len);
    *put = len;
    return 1;
}
long bio_ctrl(BIO* b, int cmd, long, void*) {
    if (cmd == BIO_CTRL_FLUSH) return 1;
    if (cmd == BIO_CTRL_EOF) {  // OpenSSL asks once a read returned nothing
        const auto* io = static_cast<const TlsIo*>(BIO_get_data(b));
        return io->eof && io->head == io->tail;
    }
    return 0;
}
int bio_create(BIO* b) {
    BIO_set_init(b, 1);
    return 1;
}

BIO_METHOD* staging_method() {
    static BIO_METHOD* method = [] {
        BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "lazymig staging");
        if (m) {
            BIO_meth_set_read_ex(m, bio_read);
            BIO_meth_set_write_ex(m, bio_write);
            BIO_meth_set_ctrl(m, bio_ctrl);
            BIO_meth_set_create(m, bio_create);
        }
        return m;
    }();
    return method;
}

// ─── keys and certificates ──────────────────────────────────────────────────────────
Result<std::string> read_secret_file(const std::string& path, bool private_key) {
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0) return LZ_SYS_ERROR("TLS: {}", path);
    if (private_key && (st.st_mode & 077) != 0)
        return logic_error(fmt::format("TLS: {} is readable by others (mode {:o}); chmod 600 it", path,
                                       st.st_mode & 0777));
    std::ifstream in(path);
    if (!in) return LZ_SYS_ERROR("TLS: reading {}", path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// "HEX" or "IDENTITY:HEX" (QEMU's keys.psk), surrounding whitespace ignored.
Result<void> parse_psk(std::string text, Security& sec, const std::string& path) {
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.erase(0, 1);
    if (auto colon = text.find(':'); colon != std::string::npos) {
        sec.psk_identity = text.substr(0, colon);
        text.erase(0, colon + 1);
    }
    if (text.size() % 2 != 0)
        return logic_error(fmt::format("TLS: {}: the key is not hex (odd number of digits)", path));
    sec.psk.clear();
    for (std::size_t i = 0; i < text.size(); i += 2) {
        unsigned v = 0;
        if (std::sscanf(text.c_str() + i, "%2x", &v) != 1 || !std::isxdigit(static_cast<unsigned char>(text[i])) ||
            !std::isxdigit(static_cast<unsigned char>(text[i + 1])))
            return logic_error(fmt::format("TLS: {}: the key is not hex (at character {})", path, i + 1));
        sec.psk.push_back(std::byte(v));
    }
    return {};
}

// TLS 1.3 external PSKs are sessions that carry the key and a cipher whose hash the
// handshake then uses: AES-128-GCM with SHA-256.
SSL_SESSION* psk_session(SSL* ssl, const std::vector<std::byte>& key) {
    static const unsigned char kAes128GcmSha256[] = {0x13, 0x01};
    const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kAes128GcmSha256);
    SSL_SESSION* s = SSL_SESSION_new();
    if (!cipher || !s) {
        SSL_SESSION_free(s);
        return nullptr;
    }
    if (!SSL_SESSION_set1_master_key(s, reinterpret_cast<const unsigned char*>(key.data()), key.size()) ||
        !SSL_SESSION_set_cipher(s, cipher) || !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
        SSL_SESSION_free(s);
        return nullptr;
    }
    return s;
}

}  // namespace

struct TlsCallbacks {
    static const TlsContext& of(SSL* ssl) {
        return *static_cast<const TlsContext*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
    }
    static int use_psk(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* idlen, SSL_SESSION** sess) {
        const auto& c = of(ssl);
        SSL_SESSION* s = psk_session(ssl, c.sec_.psk);
        if (!s) return 0;
        if (md && md != SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(s))) {
            SSL_SESSION_free(s);  // after a retry for another hash: offer no PSK
            *sess = nullptr;
            *id = nullptr;
            *idlen = 0;
            return 1;
        }
        *sess = s;
        *id = reinterpret_cast<const unsigned char*>(c.sec_.psk_identity.data());
        *idlen = c.sec_.psk_identity.size();
        return 1;
    }
    static int find_psk(SSL* ssl, const unsigned char* id, size_t idlen, SSL_SESSION** sess) {
        const auto& c = of(ssl);
        *sess = nullptr;
        if (std::string_view(reinterpret_cast<const char*>(id), idlen) != c.sec_.psk_identity) return 1;
        *sess = psk_session(ssl, c.sec_.psk);
        return *sess ? 1 : 0;
    }
};

bool probe_ktls(std::string* why) {
    static const std::pair<bool, std::string> result = [] {
        Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!fd.valid()) return std::pair{false, fmt::format("socket: {}", std::strerror(errno))};
        // The ULP attaches only to a connected socket: ENOTCONN means the kernel has it.
        if (::setsockopt(fd.get(), SOL_TCP, TCP_ULP, "tls", sizeof "tls") == 0 || errno == ENOTCONN)
            return std::pair{true, std::string("the kernel offers the tls upper-layer protocol")};
        return std::pair{false, fmt::format("setsockopt TCP_ULP \"tls\": {}", std::strerror(errno))};
    }();
    if (why) *why = result.second;
    return result.first;
}

Result<std::shared_ptr<TlsContext>> TlsContext::create(const Security& sec, bool server) {
    if (sec.auth != Auth::psk && sec.auth != Auth::x509) return logic_error("TLS: no psk or x509 credentials chosen");
    std::shared_ptr<TlsContext> c(new TlsContext(sec, server));
    c->ctx_ = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!c->ctx_) return logic_error("TLS: SSL_CTX_new: " + ssl_reason());
    SSL_CTX_set_app_data(c->ctx_, c.get());
    SSL_CTX_set_min_proto_version(c->ctx_, TLS1_3_VERSION);
    // An end of stream without close_notify reads as an end of stream, as over plain TCP:
    // the frame layer then tells a cut inside a frame from a close between frames.
    SSL_CTX_set_options(c->ctx_, SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_num_tickets(c->ctx_, 0);  // one connection per key: nothing to resume
    SSL_CTX_set_session_cache_mode(c->ctx_, SSL_SESS_CACHE_OFF);
    if (sec.auth == Auth::psk) {
        if (c->sec_.psk.empty()) {
            if (sec.psk_file.empty())
                return logic_error("TLS: authentication is on and no key was given: set a pre-shared key "
                                   "(psk or psk_file), x509 credentials, or choose auth=none explicitly");
            auto text = read_secret_file(sec.psk_file, true);
            if (!text) return std::unexpected(text.error());
            if (auto p = parse_psk(std::move(*text), c->sec_, sec.psk_file); !p) return std::unexpected(p.error());
        }
        if (c->sec_.psk.size() < 16 || c->sec_.psk.size() > 48)
            return logic_error(fmt::format("TLS: the pre-shared key has {} bytes; it needs 16 to 48 "
                                           "(`openssl rand -hex 32` makes one)", c->sec_.psk.size()));
        // The server ignores a PSK whose hash differs from the suite it chose: offer only
        // SHA-256 suites, the key's (psk_session).
        if (SSL_CTX_set_ciphersuites(c->ctx_, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256") != 1)
            return logic_error("TLS: SSL_CTX_set_ciphersuites: " + ssl_reason());
        if (server) SSL_CTX_set_psk_find_session_callback(c->ctx_, &TlsCallbacks::find_psk);
        else SSL_CTX_set_psk_use_session_callback(c->ctx_, &TlsCallbacks::use_psk);
    } else {
        if (sec.creds_dir.empty()) return logic_error("TLS: x509 chosen and no credentials directory given");
        const std::string role = server ? "server" : "client";
        const std::string ca = sec.creds_dir + "/ca-cert.pem", cert = sec.creds_dir + "/" + role + "-cert.pem",
                          key = sec.creds_dir + "/" + role + "-key.pem";
        if (auto k = read_secret_file(key, true); !k) return std::unexpected(k.error());
        if (SSL_CTX_load_verify_locations(c->ctx_, ca.c_str(), nullptr) != 1)
            return logic_error(fmt::format("TLS: CA certificate {}: {}", ca, ssl_reason()));
        if (SSL_CTX_use_certificate_chain_file(c->ctx_, cert.c_str()) != 1)
            return logic_error(fmt::format("TLS: certificate {}: {}", cert, ssl_reason()));
        if (SSL_CTX_use_PrivateKey_file(c->ctx_, key.c_str(), SSL_FILETYPE_PEM) != 1)
            return logic_error(fmt::format("TLS: private key {}: {}", key, ssl_reason()));
        if (SSL_CTX_check_private_key(c->ctx_) != 1)
            return logic_error(fmt::format("TLS: {} does not belong to {}: {}", key, cert, ssl_reason()));
        SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    }
    std::string why;
    const bool ktls = probe_ktls(&why);
    LZ_LOG(info, "tls_ready", "side={} auth={} encryption=userspace kernel_tls={} ({})",
           server ? "destination" : "source", sec.auth == Auth::psk ? "psk" : "x509",
           ktls ? "available, not used by this build" : "unavailable", why);
    return c;
}

std::string_view to_string(Auth a) noexcept {
    switch (a) {
    case Auth::psk: return "psk";
    case Auth::x509: return "x509";
    case Auth::none: return "none";
    case Auth::invalid: break;
    }
    return "invalid";
}

Result<std::shared_ptr<TlsContext>> tls_for(const Security& sec, bool server) {
    if (sec.auth == Auth::none) {
        LZ_LOG(warn, "tls_off", "side={} auth=none: channels are neither authenticated nor encrypted; anyone who "
               "reaches the port can take the VM over", server ? "destination" : "source");
        return std::shared_ptr<TlsContext>{};
    }
    if (sec.auth == Auth::invalid) return logic_error("security.auth is invalid (psk, x509 or none)");
    if (sec.handshake_timeout.count() <= 0)
        return logic_error(fmt::format("security.handshake_timeout {} ms: must be positive",
                                       sec.handshake_timeout.count()));
    return TlsContext::create(sec, server);
}

TlsContext::~TlsContext() {
    if (!sec_.psk.empty()) OPENSSL_cleanse(sec_.psk.data(), sec_.psk.size());
    SSL_CTX_free(ctx_);
}

// ─── handshake ──────────────────────────────────────────────────────────────────────
Result<Handshake> Handshake::start(std::shared_ptr<TlsContext> ctx, Fd fd, std::string peer,
                                   std::chrono::steady_clock::time_point deadline) {
    Handshake h;
    h.io_ = std::make_unique<TlsIo>();
    h.io_->rx.resize(kHandshakeBuffer);
    h.ssl_ = SSL_new(ctx->ctx_);
    BIO* bio = staging_method() ? BIO_new(staging_method()) : nullptr;
    if (!h.ssl_ || !bio) {
        BIO_free(bio);
        return logic_error("TLS: SSL_new: " + ssl_reason());
    }
    BIO_set_data(bio, h.io_.get());
    SSL_set_bio(h.ssl_, bio, bio);
    if (ctx->sec_.auth == Auth::x509 && !ctx->sec_.peer_name.empty() &&
        SSL_set1_host(h.ssl_, ctx->sec_.peer_name.c_str()) != 1)
        return logic_error("TLS: peer name: " + ssl_reason());
    if (ctx->server()) SSL_set_accept_state(h.ssl_);
    else SSL_set_connect_state(h.ssl_);
    h.ctx_ = std::move(ctx);
    h.fd_ = std::move(fd);
    h.peer_ = std::move(peer);
    h.deadline_ = deadline;
    return h;
}

Handshake::Handshake(Handshake&& o) noexcept
    : ctx_(std::move(o.ctx_)), fd_(std::move(o.fd_)), ssl_(std::exchange(o.ssl_, nullptr)), io_(std::move(o.io_)),
      peer_(std::move(o.peer_)), deadline_(o.deadline_) {}

Handshake& Handshake::operator=(Handshake&& o) noexcept {
    if (this != &o) {
        SSL_free(ssl_);
        ctx_ = std::move(o.ctx_);
        fd_ = std::move(o.fd_);
        ssl_ = std::exchange(o.ssl_, nullptr);
        io_ = std::move(o.io_);
        peer_ = std::move(o.peer_);
        deadline_ = o.deadline_;
    }
    return *this;
}

Handshake::~Handshake() { SSL_free(ssl_); }

short Handshake::events() const { return io_->tx.empty() ? POLLIN : POLLIN | POLLOUT; }

// Sends what is staged without blocking: true when nothing is left.
Result<bool> Handshake::flush() {
    std::size_t off = 0;
    auto& tx = io_->tx;
    while (off < tx.size()) {
        const ssize_t n = ::send(fd_.get(), tx.data() + off, tx.size() - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            off += static_cast<std::size_t>(n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        const int e = errno;
        return transport_error(fmt::format("TLS handshake with {}: sending: {}", peer_, std::strerror(e)), e);
    }
    tx.erase(tx.begin(), tx.begin() + static_cast<std::ptrdiff_t>(off));
    return tx.empty();
}

Result<bool> Handshake::step() {
    for (;;) {
        auto flushed = flush();
        if (!flushed) return std::unexpected(flushed.error());
        if (!*flushed) return false;
        ERR_clear_error();
        const int r = SSL_do_handshake(ssl_);
        if (r == 1) {
            flushed = flush();
            if (!flushed) return std::unexpected(flushed.error());
            return *flushed;
        }
        const int e = SSL_get_error(ssl_, r);
        if (e != SSL_ERROR_WANT_READ) {
            std::string reason = ssl_reason();
            if (const long v = SSL_get_verify_result(ssl_); v != X509_V_OK)
                reason += fmt::format(" (certificate: {})", X509_verify_cert_error_string(v));
            (void)flush();  // the alert, if any, tells the peer why
            return peer_violation(fmt::format("TLS handshake with {} failed: {}", peer_, reason));
        }
        flushed = flush();
        if (!flushed) return std::unexpected(flushed.error());
        if (!*flushed) return false;
        io_->compact();
        if (io_->tail == io_->rx.size())
            return peer_violation(fmt::format("TLS handshake with {}: a record larger than {} bytes", peer_,
                                              io_->rx.size()));
        const ssize_t n = ::recv(fd_.get(), io_->rx.data() + io_->tail, io_->rx.size() - io_->tail, MSG_DONTWAIT);
        if (n > 0) {
            io_->tail += static_cast<std::size_t>(n);
            continue;
        }
        if (n == 0)
            return transport_error(fmt::format("TLS handshake with {}: the peer closed the connection", peer_),
                                   ECONNRESET);
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        const int err = errno;
        return transport_error(fmt::format("TLS handshake with {}: receiving: {}", peer_, std::strerror(err)), err);
    }
}

Result<void> Handshake::run(int shutdown_fd) {
    for (;;) {
        auto done = step();
        if (!done) return std::unexpected(done.error());
        if (*done) return {};
        const auto left =
            std::chrono::ceil<std::chrono::milliseconds>(deadline_ - std::chrono::steady_clock::now()).count();
        if (left <= 0)
            return transport_error(fmt::format("TLS handshake with {}: not complete within {} ms", peer_,
                                               ctx_->handshake_timeout().count()), ETIMEDOUT);
        pollfd fds[2] = {{fd_.get(), events(), 0}, {shutdown_fd, POLLIN, 0}};
        const int n = ::poll(fds, shutdown_fd >= 0 ? 2 : 1, static_cast<int>(left));
        if (n < 0 && errno != EINTR) return LZ_SYS_ERROR("TLS handshake with {}: poll", peer_);
        if (n > 0 && shutdown_fd >= 0 && fds[1].revents) return sys_error("TLS handshake: shut down", ECANCELED);
    }
}

// ─── the channel ────────────────────────────────────────────────────────────────────
namespace {

class TlsChannel final : public Channel {
public:
    TlsChannel(Fd fd, SSL* ssl, std::unique_ptr<TlsIo> io, std::string where, Ring send, Ring recv)
        : fd_(std::move(fd)), ssl_(ssl), io_(std::move(io)), where_(std::move(where)), send_(std::move(send)),
          recv_(std::move(recv)) {}
    ~TlsChannel() override {
        // close_notify, best effort: the peer tells an orderly end from a cut.
        std::lock_guard lock(mu_);
        ERR_clear_error();
        if (SSL_shutdown(ssl_) >= 0)
            [[maybe_unused]] auto n = ::send(fd_.get(), io_->tx.data(), io_->tx.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        SSL_free(ssl_);
    }

    const std::string& where() const override { return where_; }

    Result<std::size_t> recv_some(void* dst, std::size_t len) override {
        for (;;) {
            int err = 0;
            bool alert = false;
            std::string reason;
            {
                std::lock_guard lock(mu_);
                ERR_clear_error();
                std::size_t got = 0;
                if (SSL_read_ex(ssl_, dst, len, &got) == 1) {
                    received_.fetch_add(got, std::memory_order_relaxed);
                    return got;
                }
                err = SSL_get_error(ssl_, 0);
                // An alert is the peer's own word (it refused us: a certificate, a
                // protocol error); anything else is a record that did not survive the link.
                alert = ERR_GET_LIB(ERR_peek_error()) == ERR_LIB_SSL &&
                        ERR_GET_REASON(ERR_peek_error()) >= SSL_AD_REASON_OFFSET;
                if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_ZERO_RETURN) reason = ssl_reason();
                io_->compact();
            }
            if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_WANT_READ && io_->eof)) return 0;
            if (err != SSL_ERROR_WANT_READ && alert) return peer_violation(fmt::format("{}: TLS: {}", where_, reason));
            // After the handshake the peer has proved the key: a record that fails its
            // check was damaged on the link (or by someone on the path). Nothing of it was
            // believed; the channel is lost like a cut one, so a post-copy pauses and a
            // recover re-authenticates on a fresh connection.
            if (err != SSL_ERROR_WANT_READ)
                return transport_error(fmt::format("{}: TLS: {}: the channel is dropped", where_, reason), EBADMSG);
            auto n = classify(recv_.recv_some(fd_.get(), io_->rx.data() + io_->tail, io_->rx.size() - io_->tail,
                                              where_));
            if (!n) return std::unexpected(n.error());
            std::lock_guard lock(mu_);
            if (*n == 0) io_->eof = true;
            io_->tail += *n;
        }
    }
    Result<void> recv_exact(void* dst, std::size_t len) override {
        std::size_t got = 0;
        while (got < len) {
            auto n = recv_some(static_cast<std::byte*>(dst) + got, len - got);
            if (!n) return std::unexpected(n.error());
            if (*n == 0)
                return transport_error(fmt::format("{}: peer closed the connection after {} of {} bytes", where_,
                                                   got, len), ECONNRESET);
            got += *n;
        }
        return {};
    }

    Result<void> send(std::span<const iovec> iov) override {
        if (auto s = send_start(iov); !s) return s;
        return send_finish();
    }
    Result<void> send_start(std::span<const iovec> iov) override {
        if (auto b = drain_backlog(); !b) return b;
        if (auto e = encrypt(iov, out_); !e) return e;
        iovec one{out_.data(), out_.size()};
        return classify(send_.send_start(fd_.get(), std::span(&one, 1), where_));
    }
    Result<void> send_finish() override {
        auto r = classify(send_.send_finish());
        if (r) sent_.fetch_add(std::exchange(pending_plain_, 0), std::memory_order_relaxed);
        return r;
    }
    Result<void> wait_until(std::chrono::steady_clock::time_point deadline) override {
        return send_.wait_until(deadline);
    }
    Result<std::size_t> try_send(std::span<const std::byte> bytes) override {
        auto left = push_backlog();
        if (!left) return std::unexpected(left.error());
        if (*left || bytes.empty()) return 0;
        iovec one{const_cast<std::byte*>(bytes.data()), bytes.size()};
        if (auto e = encrypt(std::span(&one, 1), backlog_); !e) return std::unexpected(e.error());
        backlog_head_ = 0;
        sent_.fetch_add(std::exchange(pending_plain_, 0), std::memory_order_relaxed);
        if (auto p = push_backlog(); !p) return std::unexpected(p.error());
        return bytes.size();
    }
    bool send_backlog() const override { return backlog_head_ < backlog_.size(); }
    int poll_fd() const override { return fd_.get(); }
    std::uint64_t bytes_received() const override { return received_.load(std::memory_order_relaxed); }
    std::uint64_t bytes_sent() const override { return sent_.load(std::memory_order_relaxed); }

private:
    // Encrypts `iov` into `out` (which it empties first). Only computes: the lock is held
    // for the crypto, never across I/O.
    Result<void> encrypt(std::span<const iovec> iov, std::vector<std::byte>& out) {
        out.clear();
        std::lock_guard lock(mu_);
        pending_plain_ = 0;
        for (const auto& v : iov) {
            if (v.iov_len == 0) continue;
            ERR_clear_error();
            std::size_t written = 0;
            if (SSL_write_ex(ssl_, v.iov_base, v.iov_len, &written) != 1 || written != v.iov_len)
                return peer_violation(fmt::format("{}: TLS: encrypting: {}", where_, ssl_reason()));
            pending_plain_ += written;
        }
        out.swap(io_->tx);  // io_->tx keeps out's old (empty) buffer and its capacity
        return {};
    }
    // Sends what try_send() left without blocking; true when some is still left.
    Result<bool> push_backlog() {
        while (backlog_head_ < backlog_.size()) {
            const ssize_t n = ::send(fd_.get(), backlog_.data() + backlog_head_, backlog_.size() - backlog_head_,
                                     MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0) {
                backlog_head_ += static_cast<std::size_t>(n);
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
            const int e = errno;
            return classify<bool>(sys_error(fmt::format("{}: sending", where_), e));
        }
        backlog_.clear();
        backlog_head_ = 0;
        return false;
    }
    // Before a blocking send: what try_send() left goes first, in order.
    Result<void> drain_backlog() {
        if (!send_backlog()) return {};
        iovec one{backlog_.data() + backlog_head_, backlog_.size() - backlog_head_};
        auto r = classify(send_.send_all(fd_.get(), std::span(&one, 1), where_));
        backlog_.clear();
        backlog_head_ = 0;
        return r;
    }

    Fd fd_;
    SSL* ssl_;
    std::unique_ptr<TlsIo> io_;
    std::string where_;
    Ring send_, recv_;
    std::mutex mu_;                       // the SSL object and io_->tx
    std::vector<std::byte> out_;          // ciphertext of the send in flight
    std::vector<std::byte> backlog_;      // ciphertext try_send() could not send yet
    std::size_t backlog_head_ = 0;
    std::size_t pending_plain_ = 0;
    std::atomic<std::uint64_t> received_{0}, sent_{0};
};

}  // namespace

Result<std::unique_ptr<Channel>> Handshake::into_channel(std::string where, int shutdown_fd) && {
    auto send = Ring::create(shutdown_fd);
    if (!send) return std::unexpected(send.error().wrap(where));
    auto recv = Ring::create(shutdown_fd);
    if (!recv) return std::unexpected(recv.error().wrap(where));
    // Authenticated: only now does the connection get its full receive buffer.
    io_->rx.resize(kChannelBuffer);
    std::memset(io_->rx.data() + io_->tail, 0, io_->rx.size() - io_->tail);  // populated once, here
    LZ_LOG(info, "tls_channel", "{}: authenticated ({}, {})", where, SSL_get_version(ssl_),
           SSL_CIPHER_get_name(SSL_get_current_cipher(ssl_)));
    return std::make_unique<TlsChannel>(std::move(fd_), std::exchange(ssl_, nullptr), std::move(io_),
                                        std::move(where), std::move(*send), std::move(*recv));
}

}  // namespace lazymig::net
