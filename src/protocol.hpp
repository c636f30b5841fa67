// protocol.hpp — the lazymig wire protocol, version 2. The only file that knows bytes.
//
// 1 + N channels per migration, all opened by the source (the Transport, src/net/channel.hpp):
//   urgent: handshake, region table, switchover, demand requests and their replies,
//           completion. Small frames; TCP_NODELAY. Demand replies never queue behind bulk.
//   bulk i: pushed pages, in large frames; N channels (1..kMaxBulkChannels), each
//           carrying the pages of its own share of guest RAM, each ending with PUSH_DONE.
//
//   source                                  destination (listening)
//   ─ urgent ─ HELLO{v, urgent, 0, N, session} ──►
//            ◄── HELLO_ACK{v}             (or ERROR "peer speaks version 7, we speak 2")
//   ─ bulk i ─ HELLO{v, bulk, i, N, session} ───►   for i in 0..N-1, in any order
//            ◄── HELLO_ACK{v}
//   ─ urgent ─ REGION_TABLE ─────────────►  compared with the destination's own regions
//            ◄── REGION_ACK               (or ERROR naming the first mismatch)
//   [source pauses vCPUs]
//   ─ urgent ─ DEVICE_STATE{blob} ────────►  load_device_state
//            ◄── DEVICE_LOADED            (no answer in time: the source resumes its VM)
//   ─ urgent ─ GO ────────────────────────►  resume_vcpus (after GO the source never resumes)
//            ◄── RESUMED                  downtime = pause .. RESUMED
//   ◄─ urgent ─► HEARTBEAT                during post-copy: the destination sends one every
//                                         heartbeat_timeout/4, the source echoes each
//            ◄── PAGE_REQUEST{r, first, n}   (a fault, plus a prefetch window)
//   ─ urgent ─ PAGES{r, first, n, zero bitmap, data} ─►
//   ─ bulk i ─ PAGES ... PAGES, PUSH_DONE ─►
//            ◄── COMPLETE                 every page present; both sides close
//   Either side may send ERROR{code, text} before closing on a fatal problem.
//
// Frame: a 16-byte header, little-endian, then `length` payload bytes.
//   u32 magic "LZMG" | u8 type | u8 flags (0) | u16 reserved (0) | u32 length | u32 checksum
// checksum = CRC32C over header bytes 0..11, then the payload. For PAGES the page data
// is not hashed as one stream: each page's own CRC32C (little-endian u32) is hashed in
// its place, so both ends can hash pages four at a time (crc32c.hpp). A frame whose
// checksum does not match is refused whole: none of its pages is placed.
//
// PAGES payload: u32 region | u32 count | u64 first_page | zero bitmap (ceil(count/8)
// bytes, bit i set = page first+i is all zeroes and carries no data) | the data of the
// non-zero pages in order.
//
// Value 0 of every enum is invalid. Unknown types, lengths over the limits and
// reserved bits set are errors that name the value and the channel.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "lazymig/error.hpp"
#include "lazymig/lazymig.hpp"

namespace lazymig::proto {

inline constexpr std::uint32_t kMagic = 0x474D5A4C;  // "LZMG" as little-endian bytes
inline constexpr std::uint32_t kVersion = 2;  // 2: HELLO carries the bulk channel index and count
inline constexpr std::uint8_t kMaxBulkChannels = 16;
inline constexpr std::size_t kHeaderSize = 16;
inline constexpr std::size_t kMaxControlPayload = 1u << 20;       // all but DEVICE_STATE, PAGES
inline constexpr std::size_t kMaxDeviceState = 256u << 20;
inline constexpr std::size_t kMaxPagesPayload = 64u << 20;        // one PAGES frame
inline constexpr std::uint32_t kMaxPagesPerFrame = 1024;
inline constexpr std::size_t kPagesMetaFixed = 16;                 // before the bitmap

enum class Type : std::uint8_t {
    invalid = 0,
    hello = 1,
    hello_ack = 2,
    error = 3,
    region_table = 4,
    region_ack = 5,
    device_state = 6,
    resumed = 7,
    page_request = 8,
    pages = 9,
    push_done = 10,
    complete = 11,
    // 40..49: liveness and the two-phase switchover.
    heartbeat = 40,
    device_loaded = 41,
    go = 42,
};
inline constexpr std::uint8_t kTypeLast = 11;
[[nodiscard]] bool known_type(std::uint8_t t) noexcept;
[[nodiscard]] std::string_view to_string(Type t) noexcept;

enum class Channel : std::uint8_t { invalid = 0, urgent = 1, bulk = 2 };
[[nodiscard]] std::string_view to_string(Channel c) noexcept;

struct Header {
    Type type = Type::invalid;
    std::uint32_t length = 0;
    std::uint32_t checksum = 0;
};

// Parses and validates a header: magic, known type, zero flags/reserved, length within
// the type's limit. `where` names the channel for the message ("urgent channel").
[[nodiscard]] Result<Header> parse_header(std::span<const std::byte, kHeaderSize> raw,
                                          std::string_view where) noexcept;
// Writes a header; the checksum is computed by finish_checksum().
void write_header(std::span<std::byte, kHeaderSize> out, Type type, std::uint32_t length) noexcept;
// Checksum of a non-PAGES frame: header bytes 0..11, then the payload.
[[nodiscard]] std::uint32_t frame_checksum(std::span<const std::byte, kHeaderSize> header,
                                           std::span<const std::byte> payload) noexcept;
// Checksum of a PAGES frame: header 0..11, the meta (region..bitmap), each page's CRC.
[[nodiscard]] std::uint32_t pages_checksum(std::span<const std::byte, kHeaderSize> header,
                                           std::span<const std::byte> meta,
                                           std::span<const std::uint32_t> page_crcs) noexcept;
void set_checksum(std::span<std::byte, kHeaderSize> header, std::uint32_t checksum) noexcept;

// ─── control messages ───────────────────────────────────────────────────────────────
// HELLO payload: u32 version | u8 channel | u8 mode | u8 index | u8 bulk_channels | u64 session
struct Hello {
    std::uint32_t version = kVersion;
    Channel channel = Channel::invalid;
    Mode mode = Mode::invalid;
    std::uint8_t index = 0;          // bulk: which of the N bulk channels; urgent: 0
    std::uint8_t bulk_channels = 1;  // N, the same on every channel of a migration
    std::uint64_t session = 0;
};
struct HelloAck {
    std::uint32_t version = kVersion;
};
struct ErrorMsg {
    std::uint32_t code = 0;  // errno-style, 0 when none applies
    std::string text;
};
struct RegionInfo {
    std::string name;
    std::uint64_t size = 0;
    std::uint32_t page_size = 0;
    Backing backing = Backing::invalid;
};
struct RegionTable {
    std::vector<RegionInfo> regions;
};
struct DeviceState {
    std::vector<std::byte> blob;
};
struct PageRequest {
    std::uint32_t region = 0;
    std::uint32_t count = 0;
    std::uint64_t first = 0;
};

// A whole control frame (header + payload, checksum set), ready to send.
using Frame = std::vector<std::byte>;
[[nodiscard]] Frame encode(const Hello&);
[[nodiscard]] Frame encode(const HelloAck&);
[[nodiscard]] Frame encode(const ErrorMsg&);
[[nodiscard]] Frame encode(const RegionTable&);
[[nodiscard]] Frame encode(const DeviceState&);
[[nodiscard]] Frame encode(const PageRequest&);
[[nodiscard]] Frame encode_empty(Type type);  // region_ack, resumed, push_done, complete

// Decoders take the payload of a frame whose header and checksum were verified.
[[nodiscard]] Result<Hello> decode_hello(std::span<const std::byte> payload);
[[nodiscard]] Result<HelloAck> decode_hello_ack(std::span<const std::byte> payload);
[[nodiscard]] Result<ErrorMsg> decode_error(std::span<const std::byte> payload);
[[nodiscard]] Result<RegionTable> decode_region_table(std::span<const std::byte> payload);
[[nodiscard]] Result<PageRequest> decode_page_request(std::span<const std::byte> payload);

// Compares the source's table with the destination's regions; the error names the
// first mismatch ("region 0 'ram0': size 1073741824 here, 536870912 from the source").
[[nodiscard]] Result<void> check_region_table(const RegionTable& theirs,
                                              std::span<const GuestRegion> ours);
[[nodiscard]] RegionTable region_table_of(std::span<const GuestRegion> regions);

// The last page of a range, for messages: a hostile `first` near 2^64 must not wrap.
[[nodiscard]] inline std::string last_page(std::uint64_t first, std::uint32_t count) {
    if (count == 0) return "(none)";
    if (first > UINT64_MAX - (count - 1)) return "(beyond 2^64)";
    return std::to_string(first + count - 1);
}

// ─── PAGES frames ───────────────────────────────────────────────────────────────────
struct PagesMeta {
    std::uint32_t region = 0;
    std::uint32_t count = 0;
    std::uint64_t first = 0;
    std::array<std::uint8_t, kMaxPagesPerFrame / 8> zero{};  // bit i: page first+i is zero

    [[nodiscard]] bool is_zero(std::uint32_t i) const { return zero[i / 8] >> (i % 8) & 1; }
    void set_zero(std::uint32_t i) { zero[i / 8] |= std::uint8_t(1u << (i % 8)); }
    [[nodiscard]] std::uint32_t bitmap_bytes() const { return (count + 7) / 8; }
    [[nodiscard]] std::size_t meta_bytes() const { return kPagesMetaFixed + bitmap_bytes(); }
    [[nodiscard]] std::uint32_t nonzero_pages() const;
};

// Serialises header + meta into `out` (capacity kHeaderSize + kPagesMetaFixed +
// kMaxPagesPerFrame/8); returns the bytes written. `page_crcs` holds the CRC of each
// non-zero page in order.
[[nodiscard]] std::size_t encode_pages_head(std::byte* out, const PagesMeta& meta,
                                            std::size_t page_size,
                                            std::span<const std::uint32_t> page_crcs) noexcept;
// Parses the fixed part (16 bytes) of a PAGES payload; `bitmap` is read separately.
[[nodiscard]] Result<PagesMeta> decode_pages_fixed(std::span<const std::byte, kPagesMetaFixed> raw,
                                                   std::string_view where) noexcept;
// Checks that `length` matches meta + (non-zero pages × page_size).
[[nodiscard]] Result<void> check_pages_length(const PagesMeta& meta, std::uint32_t length,
                                              std::size_t page_size,
                                              std::string_view where) noexcept;

}  // namespace lazymig::proto
