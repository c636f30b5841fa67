// tests/hostile/peer.hpp — a peer that speaks raw frames over plain blocking sockets.
//
// Frames are built with protocol.hpp's encoders, so a test corrupts exactly the bytes it
// means to. Every socket has receive and send timeouts: a peer that hangs fails the test
// (a failure detector; nothing here waits for time to pass).
#pragma once

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "src/crc32c.hpp"
#include "src/net/socket.hpp"
#include "src/protocol.hpp"
#include "tests/tls_key.hpp"

namespace hostile {

namespace proto = lazymig::proto;
inline constexpr int kTimeoutMs = 20'000;
inline constexpr std::size_t kPage = 4096;

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string("(no error)") : r.error().message();
}

struct RawFrame {
    proto::Header h;
    std::vector<std::byte> payload;
};

// One connected TCP socket, closed on destruction; TLS 1.3 with the test key unless
// made plain (a peer without any key).
class Conn {
public:
    Conn() = default;
    explicit Conn(int fd) : fd_(fd) { set_timeouts(); }
    // A TCP connection to the destination, no TLS.
    static Conn to_plain(std::uint16_t port) {
        Conn c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        REQUIRE(c.fd_.valid());
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_port = htons(port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE_MESSAGE(::connect(c.fd(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0, std::strerror(errno));
        return c;
    }
    // Authenticated with `key` (the test's own by default): the handshake must succeed.
    static Conn to(std::uint16_t port, const testkey::Key& key = testkey::key()) {
        Conn c = to_plain(port);
        c.tls_ = std::make_unique<testkey::Tls>(c.fd(), false, key);
        REQUIRE_MESSAGE(c.tls_->ok(), "TLS handshake: ", c.tls_->error());
        return c;
    }
    // Accepts one connection on `listener` and runs the TLS server handshake, or fails
    // the test after kTimeoutMs.
    static Conn accept_from(int listener) {
        pollfd p{listener, POLLIN, 0};
        REQUIRE_MESSAGE(::poll(&p, 1, kTimeoutMs) == 1, "no connection within the timeout");
        Conn c(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
        REQUIRE(c.fd_.valid());
        c.tls_ = std::make_unique<testkey::Tls>(c.fd(), true, testkey::key());
        REQUIRE_MESSAGE(c.tls_->ok(), "TLS handshake: ", c.tls_->error());
        return c;
    }
    [[nodiscard]] int fd() const { return fd_.get(); }
    void close() {
        tls_.reset();
        fd_.reset();
    }
    // No more bytes from this side (close_notify, or FIN without TLS); reading stays possible.
    void shutdown_write() {
        if (tls_) SSL_shutdown(tls_->ssl());
        else ::shutdown(fd(), SHUT_WR);
    }

    void send(std::span<const std::byte> bytes) {
        std::size_t off = 0;
        while (off < bytes.size()) {
            const ssize_t n = tls_ ? SSL_write(tls_->ssl(), bytes.data() + off, static_cast<int>(bytes.size() - off))
                                   : ::send(fd(), bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
            REQUIRE_MESSAGE(n > 0, "send: ", std::strerror(errno));
            off += static_cast<std::size_t>(n);
        }
    }
    void send(std::string_view text) { send(std::as_bytes(std::span(text.data(), text.size()))); }

    // The next frame, header and checksum verified; nullopt when the peer closed cleanly.
    std::optional<RawFrame> recv_frame() {
        std::array<std::byte, proto::kHeaderSize> head;
        if (!recv_exact(head.data(), head.size(), true)) return std::nullopt;
        auto h = proto::parse_header(head, "hostile peer");
        REQUIRE_MESSAGE(h.has_value(), err_of(h));
        RawFrame f{*h, std::vector<std::byte>(h->length)};
        REQUIRE(recv_exact(f.payload.data(), f.payload.size(), false));
        if (h->type != proto::Type::pages) REQUIRE(proto::frame_checksum(head, f.payload) == h->checksum);
        return f;
    }
    // The next frame, which must be `want`; an ERROR frame fails the test with its text.
    RawFrame expect(proto::Type want) {
        auto f = recv_frame();
        REQUIRE_MESSAGE(f.has_value(), "peer closed while ", proto::to_string(want), " was expected");
        if (f->h.type == proto::Type::error && want != proto::Type::error) {
            auto e = proto::decode_error(f->payload);
            FAIL("peer sent ERROR: ", e ? e->text : err_of(e));
        }
        REQUIRE_MESSAGE(f->h.type == want, "got ", proto::to_string(f->h.type));
        return std::move(*f);
    }
    std::string expect_error_text() {
        auto f = expect(proto::Type::error);
        auto e = proto::decode_error(f.payload);
        REQUIRE_MESSAGE(e.has_value(), err_of(e));
        return e->text;
    }

private:
    void set_timeouts() {
        timeval tv{kTimeoutMs / 1000, 0};
        ::setsockopt(fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ::setsockopt(fd(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    // False on a clean close before the first byte when `eof_ok`.
    bool recv_exact(std::byte* dst, std::size_t len, bool eof_ok) {
        std::size_t got = 0;
        while (got < len) {
            const ssize_t n = tls_ ? SSL_read(tls_->ssl(), dst + got, static_cast<int>(len - got))
                                   : ::recv(fd(), dst + got, len - got, 0);
            if (n == 0 && got == 0 && eof_ok) return false;
            REQUIRE_MESSAGE(n > 0, "recv: ", n == 0 ? "closed inside a frame" : std::strerror(errno));
            got += static_cast<std::size_t>(n);
        }
        return true;
    }
    lazymig::net::Fd fd_;
    std::unique_ptr<testkey::Tls> tls_;  // destroyed before fd_ closes
};

// A PAGES frame for pages [first, first+count): page i is zero when bit i of `zero` is
// set, else filled with `fill + i`. The checksum is right unless the caller corrupts it.
inline proto::Frame pages_frame(std::uint32_t region, std::uint64_t first, std::uint32_t count,
                                std::uint64_t zero = 0, unsigned fill = 0xA0, proto::Type type = proto::Type::pages) {
    proto::PagesMeta meta;
    meta.region = region;
    meta.count = count;
    meta.first = first;
    std::vector<std::byte> data;
    std::vector<std::uint32_t> crcs;
    for (std::uint32_t i = 0; i < count; ++i) {
        if (i < 64 && (zero >> i & 1)) {
            meta.set_zero(i);
            continue;
        }
        std::vector<std::byte> page(kPage, std::byte{static_cast<unsigned char>(fill + i)});
        crcs.push_back(lazymig::crc32c(0, page.data(), page.size()));
        data.insert(data.end(), page.begin(), page.end());
    }
    proto::Frame f(proto::kHeaderSize + proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8);
    f.resize(proto::encode_pages_head(f.data(), meta, kPage, crcs, type));
    f.insert(f.end(), data.begin(), data.end());
    return f;
}

// Rewrites a frame's length field (and nothing else: the checksum then no longer matches
// unless the caller recomputes it).
inline void set_length(proto::Frame& f, std::uint32_t length) { std::memcpy(f.data() + 8, &length, 4); }

}  // namespace hostile
