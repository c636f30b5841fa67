#include "src/net/frames.hpp"

#include <cstring>

#include <fmt/format.h>

namespace lazymig::net {

FrameReader::FrameReader(Channel& channel, std::size_t buffer)
    : channel_(channel), where_(channel.where()), buf_(buffer) {}

Result<std::optional<proto::Header>> FrameReader::next() {
    std::size_t have = tail_ - head_;
    if (have == 0) {
        head_ = tail_ = 0;
        auto n = channel_.recv_some(buf_.data(), buf_.size());
        if (!n) return std::unexpected(n.error());
        if (*n == 0) return std::nullopt;
        tail_ = *n;
    }
    if (auto r = read(raw_.data(), raw_.size()); !r) {
        if (r.error().code == ECONNRESET)
            return transport_error(fmt::format("{}: truncated frame: the peer closed the connection "
                                               "inside a frame header", where_), 0);
        return std::unexpected(r.error());
    }
    auto h = proto::parse_header(raw_, where_);
    if (!h) return std::unexpected(h.error());  // proto's errors are peer violations
    const std::size_t limit = proto::carries_pages(h->type)              ? proto::kMaxPagesPayload
                              : h->type == proto::Type::device_state || h->type == proto::Type::epoch_device ? max_device_state_
                                                                      : proto::kMaxControlPayload;
    if (h->length > limit)
        return peer_violation(fmt::format("{}: {} frame of {} bytes exceeds the {} bytes allowed here", where_,
                                          proto::to_string(h->type), h->length, limit));
    return *h;
}

Result<void> FrameReader::read(std::byte* dst, std::size_t len) {
    // An empty control payload comes as (nullptr, 0): memcpy's pointers must be valid
    // even for 0 bytes (UBSan: nonnull-attribute), so nothing is copied at all.
    if (len == 0) return {};
    const std::size_t buffered = std::min(len, tail_ - head_);
    std::memcpy(dst, buf_.data() + head_, buffered);
    head_ += buffered;
    dst += buffered;
    len -= buffered;
    if (len == 0) return {};
    head_ = tail_ = 0;
    if (len >= buf_.size() / 2) {  // large: straight into the caller's memory
        return channel_.recv_exact(dst, len);
    }
    while (len > 0) {  // small: refill the buffer, which may also pick up the next frames
        auto n = channel_.recv_some(buf_.data(), buf_.size());
        if (!n) return std::unexpected(n.error());
        if (*n == 0)
            return transport_error(fmt::format("{}: peer closed the connection inside a frame", where_), ECONNRESET);
        tail_ = *n;
        const std::size_t take = std::min(len, tail_);
        std::memcpy(dst, buf_.data(), take);
        head_ = take;
        dst += take;
        len -= take;
    }
    return {};
}

Result<std::vector<std::byte>> FrameReader::read_control(const proto::Header& h) {
    std::vector<std::byte> payload(h.length);
    if (auto r = read(payload.data(), payload.size()); !r) {
        if (r.error().code == ECONNRESET)
            return transport_error(fmt::format("{}: truncated {} frame: the peer closed the connection inside it",
                                               where_, proto::to_string(h.type)), 0);
        return std::unexpected(r.error());
    }
    const auto sum = proto::frame_checksum(raw_, payload);
    if (sum != h.checksum)
        return peer_violation(fmt::format("{}: {} frame checksum mismatch (got {:#010x}, computed {:#010x})",
                                       where_, proto::to_string(h.type), h.checksum, sum));
    return payload;
}

Result<std::vector<std::byte>> FrameReader::expect(proto::Type want) {
    auto h = next();
    if (!h) return std::unexpected(h.error());
    if (!*h)
        return transport_error(fmt::format("{}: peer closed the connection while {} was expected", where_,
                                           proto::to_string(want)), 0);
    // The type decides before the payload is read: nothing is allocated for a frame
    // that is refused anyway.
    if ((*h)->type != want && (*h)->type != proto::Type::error)
        return peer_violation(fmt::format("{}: expected {}, got {}", where_, proto::to_string(want),
                                          proto::to_string((*h)->type)));
    auto payload = read_control(**h);
    if (!payload) return std::unexpected(payload.error());
    if ((*h)->type == proto::Type::error && want != proto::Type::error)
        return std::unexpected(peer_error(*payload, where_));
    if ((*h)->type != want)
        return peer_violation(fmt::format("{}: expected {}, got {}", where_, proto::to_string(want),
                                       proto::to_string((*h)->type)));
    return payload;
}

Result<void> send_frame(Channel& channel, std::span<const std::byte> frame) {
    iovec one{const_cast<std::byte*>(frame.data()), frame.size()};
    return channel.send(std::span(&one, 1));
}

Error peer_error(std::span<const std::byte> payload, std::string_view where) {
    auto m = proto::decode_error(payload);
    if (!m) return m.error().wrap(fmt::format("{}: undecodable ERROR from the peer", where));
    return Error{0, fmt::format("{}: peer reported: {}", where, m->text), ErrorClass::peer_violation};
}

}  // namespace lazymig::net
