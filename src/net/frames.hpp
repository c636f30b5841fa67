// net/frames.hpp — framed reading and writing over a Ring.
//
// FrameReader buffers small reads (headers, requests, page metadata arrive many to a
// recv) and hands large payloads straight to the caller's memory, so page data is
// received once, into an already-populated buffer, never through the small buffer.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "src/net/channel.hpp"
#include "src/protocol.hpp"

namespace lazymig::net {

class FrameReader {
public:
    explicit FrameReader(Channel& channel, std::size_t buffer = 64 * 1024);

    // The next header, validated; nullopt on a clean close between frames.
    [[nodiscard]] Result<std::optional<proto::Header>> next();
    // The raw bytes of the header next() returned (for checksums).
    [[nodiscard]] std::span<const std::byte, proto::kHeaderSize> raw_header() const { return raw_; }
    // Reads the next `len` bytes of the current frame's payload.
    [[nodiscard]] Result<void> read(std::byte* dst, std::size_t len);
    // Reads a whole control payload and verifies the frame checksum.
    [[nodiscard]] Result<std::vector<std::byte>> read_control(const proto::Header& h);
    // Reads the next frame, which must be of type `want` (an ERROR frame from the peer
    // becomes an error carrying its text). Returns the verified payload.
    [[nodiscard]] Result<std::vector<std::byte>> expect(proto::Type want);

    [[nodiscard]] const std::string& where() const { return channel_.where(); }
    [[nodiscard]] Channel& channel() const { return channel_; }
    // The largest payload a DEVICE_STATE may announce now: kMaxControlPayload like any
    // control frame, raised by the session (to the configured maximum) only while a
    // DEVICE_STATE is legal; page frames are held to kMaxPagesPayload. next() refuses a
    // larger one from its header, before anything is allocated for it (one that fits is
    // then refused by the session's order checks, naming what it expected).
    void set_max_device_state(std::size_t bytes) { max_device_state_ = bytes; }

private:
    Channel& channel_;
    const std::string& where_;
    std::vector<std::byte> buf_;
    std::size_t head_ = 0, tail_ = 0;  // unread bytes are buf_[head_, tail_)
    std::size_t max_device_state_ = proto::kMaxControlPayload;
    std::array<std::byte, proto::kHeaderSize> raw_{};
};

// Sends a whole encoded frame.
[[nodiscard]] Result<void> send_frame(Channel& channel, std::span<const std::byte> frame);

// Turns a received ERROR payload into an Error: "peer reported: <text>".
[[nodiscard]] Error peer_error(std::span<const std::byte> payload, std::string_view where);

}  // namespace lazymig::net
