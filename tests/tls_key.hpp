// tests/tls_key.hpp — a pre-shared key generated per test process, and TLS 1.3 PSK on a
// plain blocking socket for the tests' own raw peers.
//
// Authentication is on by default, so every test that migrates hands both sides this
// key (security()); two-process tests write it to a 0600 file (write_file) for the
// other process. A raw peer that speaks frames wraps its socket with Tls (client or
// server) and the same key, or another one to play a stranger.
#pragma once

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "lazymig/lazymig.hpp"

namespace testkey {

using Key = std::vector<std::byte>;

inline Key random_key() {
    Key k(32);
    if (RAND_bytes(reinterpret_cast<unsigned char*>(k.data()), static_cast<int>(k.size())) != 1) std::abort();
    return k;
}
// This process's key (the same on every call).
inline const Key& key() {
    static const Key k = random_key();
    return k;
}
inline lazymig::Security security(const Key& k = key()) { return {.auth = lazymig::Auth::psk, .psk = k}; }

inline std::string hex(const Key& k) {
    static const char digits[] = "0123456789abcdef";
    std::string s;
    for (auto b : k) {
        s += digits[std::to_integer<unsigned>(b) >> 4];
        s += digits[std::to_integer<unsigned>(b) & 15];
    }
    return s;
}
// Writes `k` as hex to `path`, mode 0600; false on failure.
inline bool write_file(const std::string& path, const Key& k = key()) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    const std::string text = hex(k) + "\n";
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fchmod(fd, 0600) == 0;
    ::close(fd);
    return ok;
}

// TLS 1.3 with an external PSK over a connected blocking socket (the caller keeps the fd).
class Tls {
public:
    // Runs the handshake; ok() tells whether it succeeded, error() why not.
    Tls(int fd, bool server, Key k, std::string identity = "lazymig")
        : key_(std::move(k)), identity_(std::move(identity)) {
        ctx_ = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
        SSL_CTX_set_min_proto_version(ctx_, TLS1_3_VERSION);
        SSL_CTX_set_num_tickets(ctx_, 0);
        SSL_CTX_set_ciphersuites(ctx_, "TLS_AES_128_GCM_SHA256");  // the PSK's hash
        if (server) SSL_CTX_set_psk_find_session_callback(ctx_, find);
        else SSL_CTX_set_psk_use_session_callback(ctx_, use);
        ssl_ = SSL_new(ctx_);
        SSL_set_app_data(ssl_, this);
        SSL_set_fd(ssl_, fd);
        ok_ = (server ? SSL_accept(ssl_) : SSL_connect(ssl_)) == 1;
        if (!ok_) {
            char buf[256];
            ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
            error_ = buf;
        }
    }
    ~Tls() {
        SSL_free(ssl_);
        SSL_CTX_free(ctx_);
    }
    Tls(const Tls&) = delete;
    Tls& operator=(const Tls&) = delete;

    [[nodiscard]] bool ok() const { return ok_; }
    [[nodiscard]] const std::string& error() const { return error_; }
    [[nodiscard]] SSL* ssl() const { return ssl_; }

private:
    static SSL_SESSION* session(SSL* ssl, const Key& k) {
        static const unsigned char aes128gcm[] = {0x13, 0x01};
        SSL_SESSION* s = SSL_SESSION_new();
        SSL_SESSION_set1_master_key(s, reinterpret_cast<const unsigned char*>(k.data()), k.size());
        SSL_SESSION_set_cipher(s, SSL_CIPHER_find(ssl, aes128gcm));
        SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION);
        return s;
    }
    static int use(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* idlen, SSL_SESSION** sess) {
        auto* t = static_cast<Tls*>(SSL_get_app_data(ssl));
        SSL_SESSION* s = session(ssl, t->key_);
        if (md && md != SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(s))) {
            SSL_SESSION_free(s);
            *sess = nullptr;
            return 1;
        }
        *sess = s;
        *id = reinterpret_cast<const unsigned char*>(t->identity_.data());
        *idlen = t->identity_.size();
        return 1;
    }
    static int find(SSL* ssl, const unsigned char* id, size_t idlen, SSL_SESSION** sess) {
        auto* t = static_cast<Tls*>(SSL_get_app_data(ssl));
        *sess = std::string_view(reinterpret_cast<const char*>(id), idlen) == t->identity_ ? session(ssl, t->key_)
                                                                                           : nullptr;
        return 1;
    }

    Key key_;
    std::string identity_;
    SSL_CTX* ctx_ = nullptr;
    SSL* ssl_ = nullptr;
    bool ok_ = false;
    std::string error_;
};

}  // namespace testkey
