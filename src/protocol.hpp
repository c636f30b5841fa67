// protocol.hpp — the lazymig wire protocol, version 3. The only file that knows bytes.
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
// Pre-copy (modes precopy and hybrid), between REGION_ACK and DEVICE_STATE:
//   ─ bulk i ─ PRECOPY_PAGES ... ─►    rounds while the VM runs at the source: the same
//                                      payload as PAGES; the destination writes them to
//                                      their final place without mapping them (file:
//                                      STAGED; anonymous: UFFDIO_COPY). A page always
//                                      travels on the channel whose share holds it, so
//                                      its copies arrive in the order they were read.
//   ─ bulk i ─ ROUND_END{n} ─►          after round n's frames on every channel
//            ◄── ROUND_ACK{n}           (urgent) every channel's round n is placed: the
//                                      source times the round end to end and starts n+1,
//                                      so at most one round is ever in flight
//   [source pauses vCPUs, final dirty scan]
//   ─ bulk i ─ (precopy mode: the last dirty pages as PRECOPY_PAGES), PRECOPY_END ─►
//   ─ urgent ─ STALE{runs} ... ─►      hybrid: pages written after they were sent; the
//                                      destination applies them once every bulk channel
//                                      has delivered PRECOPY_END: they go back to MISSING
//   ─ urgent ─ DEVICE_STATE ─►         then as above (post-copy of what is missing)
//   The destination resumes only after PRECOPY_END on every bulk channel.
//
// Recovery (post-copy, TCP). The link is lost (heartbeat silence, reset, EOF, a send
// deadline) or a side pause()s: both sides close every channel and move to `paused`,
// keeping the page-state table, the sent map and the pusher's sweep. Faults meanwhile
// stay REQUESTED (bounded by the table; nothing is queued). recover(uri) on each side
// (the destination listens again, same or new address, same credentials) then:
//   source                                  destination (listening again)
//   ─ urgent ─ RESUME{v, session, N} ─────►  another session id: ERROR, connection closed,
//                                            the destination keeps listening
//            ◄── LACKING{runs} ...          every page not PRESENT (QEMU's receive bitmap)
//            ◄── LACKING_END{pages}         the sum of the runs
//   [source: sent map := present pages only, so the push resends what was lost in flight]
//   ─ bulk i ─ HELLO{v, bulk, i, N, session} ─►  for i in 0..N-1, as at first
//            ◄── HELLO_ACK
//   [destination: PAGE_REQUEST again for every REQUESTED page; back to `postcopy`]
//            ◄── PAGE_REQUEST ... / PAGES ... / PUSH_DONE / COMPLETE as before
// A failure in here goes back to `paused`; a later recover() starts over. The channels
// reopened are opened in one function on each side (Source: open_link_channels;
// Destination: accept_link_channels).
//
// PRECOPY_LZ4 payload: the PAGES meta (region, count, first, zero bitmap), then for each
// non-zero page u32 stored | `stored` bytes: stored == page size is the page as it is,
// less is an LZ4 block that decompresses to exactly one page. The checksum is that of the
// PAGES frame the pages make (each decompressed page's CRC32C), so a page that does not
// decompress to what was read at the source is refused with its frame.
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
inline constexpr std::uint32_t kVersion = 3;  // 2: HELLO carries the bulk channel index and count; 3: pre-copy, RDMA set-up, heartbeat and two-phase switchover frames
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
    precopy_pages = 50,  // pre-copy: PAGES payload, placed without mapping
    precopy_end = 51,    // bulk channel: no more pre-copy frames on this channel
    stale = 52,          // urgent: runs of pages dirtied after they were sent
    precopy_lz4 = 53,    // pre-copy, each non-zero page lz4-compressed (below)
    round_end = 54,      // bulk: u32 round — the round's last frame on this channel
    round_ack = 55,      // urgent, to the source: u32 round — placed from every channel
    // RDMA (60..69): the destination READs pages itself; these set it up (see RdmaRegions).
    rdma_offer = 60,
    rdma_listen = 61,
    rdma_regions = 62,
    rdma_ready = 63,
    zero_bitmap = 64,
    sample_crcs = 65,
    scan_done = 66,
    // Recovery (70..79): a post-copy whose link was lost resumes on a new link (below).
    resume = 70,       // urgent, to the destination: u32 version | u64 session | u8 bulk_channels
    lacking = 71,      // urgent, to the source: runs of pages not present (STALE's layout)
    lacking_end = 72,  // urgent, to the source: u64 pages lacking in all (the runs' sum)
    // Back-replication (80..89, hybrid post-copy, the replication channel; see below).
    epoch_begin = 80,
    epoch_pages = 81,
    epoch_device = 82,
    epoch_end = 83,
    epoch_ack = 84,
    release = 85,  // replication, to the destination: the source read COMPLETE (see below)
};
inline constexpr std::uint8_t kTypeLast = 11;
inline constexpr std::uint8_t kPrecopyTypeFirst = 50, kPrecopyTypeLast = 55;
inline constexpr std::uint8_t kRdmaTypeFirst = 60, kRdmaTypeLast = 66;
inline constexpr std::uint8_t kRecoverTypeFirst = 70, kRecoverTypeLast = 72;
inline constexpr std::uint8_t kEpochTypeFirst = 80, kEpochTypeLast = 85;
// A type this build speaks (any of the ranges above).
[[nodiscard]] bool known_type(std::uint8_t t) noexcept;
// PAGES, PRECOPY_PAGES, PRECOPY_LZ4, EPOCH_PAGES: page data, bounded by kMaxPagesPayload.
[[nodiscard]] constexpr bool carries_pages(Type t) noexcept {
    return t == Type::pages || t == Type::precopy_pages || t == Type::precopy_lz4 || t == Type::epoch_pages;
}
[[nodiscard]] std::string_view to_string(Type t) noexcept;

enum class Channel : std::uint8_t { invalid = 0, urgent = 1, bulk = 2, replication = 3 };
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
// ROUND_END and ROUND_ACK payload: u32 round (1 = the first pass).
struct RoundMark {
    std::uint32_t round = 0;
};
// STALE payload: u32 n | n × (u32 region | u32 count | u64 first). At most kMaxStaleRuns
// runs per frame; a larger set goes as several frames.
struct StaleRun {
    std::uint32_t region = 0;
    std::uint32_t count = 0;
    std::uint64_t first = 0;
};
inline constexpr std::size_t kMaxStaleRuns = (kMaxControlPayload - 4) / 16;
struct StaleSet {
    std::vector<StaleRun> runs;
};
// RESUME payload: u32 version | u64 session | u8 bulk_channels.
struct Resume {
    std::uint32_t version = kVersion;
    std::uint64_t session = 0;
    std::uint8_t bulk_channels = 1;
};
// LACKING payload: as STALE (u32 n | n × (u32 region | u32 count | u64 first)), 1 to
// kMaxStaleRuns runs; LACKING_END: u64 the number of pages of all the runs sent.
struct Lacking {
    std::vector<StaleRun> runs;
};
struct LackingEnd {
    std::uint64_t pages = 0;
};

// A whole control frame (header + payload, checksum set), ready to send.
using Frame = std::vector<std::byte>;
[[nodiscard]] Frame encode(const Hello&);
[[nodiscard]] Frame encode(const HelloAck&);
[[nodiscard]] Frame encode(const ErrorMsg&);
[[nodiscard]] Frame encode(const RegionTable&);
[[nodiscard]] Frame encode(const DeviceState&);
[[nodiscard]] Frame encode(const PageRequest&);
[[nodiscard]] Frame encode(const StaleSet&);  // REQUIRES: runs.size() <= kMaxStaleRuns
[[nodiscard]] Frame encode(Type round_end_or_ack, const RoundMark&);
[[nodiscard]] Frame encode(const Resume&);
[[nodiscard]] Frame encode(const Lacking&);  // REQUIRES: runs.size() <= kMaxStaleRuns
[[nodiscard]] Frame encode(const LackingEnd&);
[[nodiscard]] Frame encode_empty(Type type);  // region_ack, resumed, push_done, complete

// Decoders take the payload of a frame whose header and checksum were verified.
[[nodiscard]] Result<Hello> decode_hello(std::span<const std::byte> payload);
[[nodiscard]] Result<HelloAck> decode_hello_ack(std::span<const std::byte> payload);
[[nodiscard]] Result<ErrorMsg> decode_error(std::span<const std::byte> payload);
[[nodiscard]] Result<RegionTable> decode_region_table(std::span<const std::byte> payload);
[[nodiscard]] Result<PageRequest> decode_page_request(std::span<const std::byte> payload);
[[nodiscard]] Result<StaleSet> decode_stale(std::span<const std::byte> payload);
[[nodiscard]] Result<RoundMark> decode_round(Type type, std::span<const std::byte> payload);
[[nodiscard]] Result<Resume> decode_resume(std::span<const std::byte> payload);
[[nodiscard]] Result<Lacking> decode_lacking(std::span<const std::byte> payload);
[[nodiscard]] Result<LackingEnd> decode_lacking_end(std::span<const std::byte> payload);

// Compares the source's table with the destination's regions; the error names the
// first mismatch ("region 0 'ram0': size 1073741824 here, 536870912 from the source").
[[nodiscard]] Result<void> check_region_table(const RegionTable& theirs,
                                              std::span<const GuestRegion> ours);
[[nodiscard]] RegionTable region_table_of(std::span<const GuestRegion> regions);

// ─── back-replication (hybrid post-copy) ──────────────────────────────────────────
// The source opens one more channel in hybrid mode, after the bulk ones:
//   ─ replication ─ HELLO{v, replication, 0, N, session} ──►   ◄── HELLO_ACK
// From the destination's resume on, every epoch (Parameters::epoch_ms) it sends, on
// that channel, the pages the VM dirtied since the previous epoch and its device state:
//            ◄── EPOCH_BEGIN{n, pages, device_bytes}
//            ◄── EPOCH_PAGES ... (PAGES payload and checksum)
//            ◄── EPOCH_DEVICE{blob}
//            ◄── EPOCH_END{n, frames, checksum}   checksum: CRC32C over the frame
//                                                  checksums of the epoch's EPOCH_PAGES
//                                                  and EPOCH_DEVICE frames, in order
//   ─ replication ─ EPOCH_ACK{n} ──►   the source applied epoch n whole: the
//                                      destination releases n's output (output commit)
//            ◄── COMPLETE (urgent)
//   ─ replication ─ RELEASE ──►         the source read COMPLETE and will never resume
//                                      the VM: the destination's lease and held output
//                                      end here, not at COMPLETE. A link lost before
//                                      RELEASE arrives fences the destination when its
//                                      lease lapses, and the source (which sends RELEASE
//                                      only once it has given the VM up for good, and
//                                      fails over if it cannot send it) may resume it:
//                                      never two running copies; if RELEASE was sent but
//                                      never read, none (both sides say so).
// Epochs are numbered 1, 2, 3... without gaps; the source applies an epoch only once it
// is whole and every checksum matched (a partial epoch is discarded, a bad checksum is
// a peer violation). EPOCH_BEGIN's counts bound what the source accepts for the epoch.
struct EpochBegin {
    std::uint64_t epoch = 0;         // 1, 2, 3...
    std::uint64_t pages = 0;         // pages the epoch's EPOCH_PAGES frames carry
    std::uint64_t device_bytes = 0;  // the EPOCH_DEVICE blob
};
struct EpochEnd {
    std::uint64_t epoch = 0;
    std::uint32_t frames = 0;    // EPOCH_PAGES + EPOCH_DEVICE frames of the epoch
    std::uint32_t checksum = 0;  // see above
};
struct EpochAck {
    std::uint64_t epoch = 0;
};
[[nodiscard]] Frame encode(const EpochBegin&);
[[nodiscard]] Frame encode(const EpochEnd&);
[[nodiscard]] Frame encode(const EpochAck&);
[[nodiscard]] Frame encode_epoch_device(std::span<const std::byte> blob);
[[nodiscard]] Result<EpochBegin> decode_epoch_begin(std::span<const std::byte> payload);
[[nodiscard]] Result<EpochEnd> decode_epoch_end(std::span<const std::byte> payload);
[[nodiscard]] Result<EpochAck> decode_epoch_ack(std::span<const std::byte> payload);
// The running epoch checksum: folds one frame's checksum in (start from 0).
[[nodiscard]] std::uint32_t epoch_fold(std::uint32_t running, std::uint32_t frame_checksum) noexcept;

// ─── RDMA data path (src/net/rdma.hpp) ──────────────────────────────────────────────
// With an rdma: URI the channels above stay TCP and carry control only; page bytes move
// by RDMA READ that the destination posts into the source's registered guest memory:
//            ◄── REGION_ACK
//   ─ urgent ─ RDMA_OFFER ───────────────►  (a TCP destination refuses it: no silent TCP)
//            ◄── RDMA_LISTEN{port}         the destination's rdma_cm listener
//   source connects two RC queue pairs there (faults, bulk), private data = session
//   ─ urgent ─ RDMA_REGIONS{addr, length, rkey per region, odp} ─►
//            ◄── RDMA_READY                   QPs up, memory registered on both sides
//   ... DEVICE_STATE, RESUMED as above; PAGE_REQUEST and PAGES are not used ...
//   ─ bulk 0 ─ ZERO_BITMAP{r, first, n, bits}..., SAMPLE_CRCS{r, (page, crc)...}...,
//              SCAN_DONE ─►               the destination's bulk pull starts
//            ◄── COMPLETE
struct RdmaListen {
    std::uint16_t port = 0;
};
struct RdmaRegion {
    std::uint64_t addr = 0, length = 0;
    std::uint32_t rkey = 0;
};
struct RdmaRegions {
    std::vector<RdmaRegion> regions;
    bool on_demand = false;  // registered with IBV_ACCESS_ON_DEMAND (nothing pinned)
};
struct ZeroBitmap {
    std::uint32_t region = 0;
    std::uint64_t first = 0;
    std::uint32_t count = 0;
    std::vector<std::uint8_t> bits;  // bit i (LSB first): page first+i is all zeroes
};
struct SampleCrc {
    std::uint64_t page = 0;
    std::uint32_t crc = 0;  // CRC32C of the page as the source holds it
};
struct SampleCrcs {
    std::uint32_t region = 0;
    std::vector<SampleCrc> samples;
};
[[nodiscard]] Frame encode(const RdmaListen&);
[[nodiscard]] Frame encode(const RdmaRegions&);
[[nodiscard]] Frame encode(const ZeroBitmap&);
[[nodiscard]] Frame encode(const SampleCrcs&);
[[nodiscard]] Result<RdmaListen> decode_rdma_listen(std::span<const std::byte> payload);
[[nodiscard]] Result<RdmaRegions> decode_rdma_regions(std::span<const std::byte> payload);
[[nodiscard]] Result<ZeroBitmap> decode_zero_bitmap(std::span<const std::byte> payload);
[[nodiscard]] Result<SampleCrcs> decode_sample_crcs(std::span<const std::byte> payload);

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
                                            std::span<const std::uint32_t> page_crcs,
                                            Type type = Type::pages) noexcept;  // or precopy_pages
// Parses the fixed part (16 bytes) of a PAGES payload; `bitmap` is read separately.
[[nodiscard]] Result<PagesMeta> decode_pages_fixed(std::span<const std::byte, kPagesMetaFixed> raw,
                                                   std::string_view where) noexcept;
// Checks that `length` matches meta + (non-zero pages × page_size); `packed`
// (PRECOPY_LZ4): that it lies between meta + 5 and meta + 4 + page_size bytes per page.
[[nodiscard]] Result<void> check_pages_length(const PagesMeta& meta, std::uint32_t length,
                                              std::size_t page_size,
                                              std::string_view where, bool packed = false) noexcept;

}  // namespace lazymig::proto
