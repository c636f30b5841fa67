#include "src/protocol.hpp"

#include <bit>
#include <cstring>

#include <fmt/format.h>

#include "src/crc32c.hpp"

namespace lazymig::proto {
namespace {

template <class T>
T to_le(T v) noexcept {
    if constexpr (std::endian::native == std::endian::big) return std::byteswap(v);
    return v;
}
template <class T>
void put(std::byte* p, T v) noexcept {
    v = to_le(v);
    std::memcpy(p, &v, sizeof v);
}
template <class T>
T get(const std::byte* p) noexcept {
    T v;
    std::memcpy(&v, p, sizeof v);
    return to_le(v);
}

// Appends little-endian fields to a frame under construction.
class Writer {
public:
    // Room for a small frame up front (and g++ 12's -Warray-bounds false positive on
    // growing a vector first sized to the 16-byte header goes away).
    explicit Writer(Type type) : type_(type) {
        out_.reserve(kHeaderSize + 112);
        out_.resize(kHeaderSize);
    }
    template <class T>
    Writer& num(T v) {
        const auto at = out_.size();
        out_.resize(at + sizeof v);
        put(out_.data() + at, v);
        return *this;
    }
    Writer& bytes(std::span<const std::byte> b) {
        out_.insert(out_.end(), b.begin(), b.end());
        return *this;
    }
    Writer& str(std::string_view s) {
        num<std::uint32_t>(static_cast<std::uint32_t>(s.size()));
        return bytes(std::as_bytes(std::span(s.data(), s.size())));
    }
    Frame finish() {
        auto head = std::span<std::byte, kHeaderSize>(out_.data(), kHeaderSize);
        write_header(head, type_, static_cast<std::uint32_t>(out_.size() - kHeaderSize));
        set_checksum(head, frame_checksum(head, std::span(out_).subspan(kHeaderSize)));
        return std::move(out_);
    }

private:
    Type type_;
    Frame out_;
};

// Reads fields from a payload; every shortfall is an error naming the message and offset.
class Reader {
public:
    Reader(std::span<const std::byte> in, Type type) : in_(in), type_(type) {}
    template <class T>
    Result<T> num() {
        if (auto r = need(sizeof(T)); !r) return std::unexpected(r.error());
        T v = get<T>(in_.data() + pos_);
        pos_ += sizeof(T);
        return v;
    }
    Result<std::string> str(std::size_t max) {
        auto n = num<std::uint32_t>();
        if (!n) return std::unexpected(n.error());
        if (*n > max)
            return peer_violation(fmt::format("{}: string of {} bytes at offset {} exceeds {}",
                                           to_string(type_), *n, pos_ - 4, max));
        if (auto r = need(*n); !r) return std::unexpected(r.error());
        std::string s(reinterpret_cast<const char*>(in_.data() + pos_), *n);
        pos_ += *n;
        return s;
    }
    Result<void> done() const {
        if (pos_ != in_.size())
            return peer_violation(fmt::format("{}: {} unexpected trailing bytes", to_string(type_),
                                           in_.size() - pos_));
        return {};
    }

private:
    Result<void> need(std::size_t n) const {
        if (in_.size() - pos_ < n)
            return peer_violation(fmt::format("{}: truncated: need {} bytes at offset {}, have {}",
                                           to_string(type_), n, pos_, in_.size() - pos_));
        return {};
    }
    std::span<const std::byte> in_;
    std::size_t pos_ = 0;
    Type type_;
};

std::size_t max_payload(Type t) noexcept {
    switch (t) {
    case Type::device_state:
    case Type::epoch_device: return kMaxDeviceState;
    case Type::epoch_pages:
    case Type::pages:
    case Type::precopy_pages:
    case Type::precopy_lz4: return kMaxPagesPayload;
    default: return kMaxControlPayload;
    }
}

// Unwraps a Result inside a decoder, returning its error.
#define LZ_TRY(var, expr)                                         \
    auto var##_r = (expr);                                        \
    if (!var##_r) return std::unexpected(std::move(var##_r.error())); \
    auto var = *var##_r

}  // namespace

std::string_view to_string(Type t) noexcept {
    switch (t) {
    case Type::hello: return "HELLO";
    case Type::hello_ack: return "HELLO_ACK";
    case Type::error: return "ERROR";
    case Type::region_table: return "REGION_TABLE";
    case Type::region_ack: return "REGION_ACK";
    case Type::device_state: return "DEVICE_STATE";
    case Type::resumed: return "RESUMED";
    case Type::page_request: return "PAGE_REQUEST";
    case Type::pages: return "PAGES";
    case Type::push_done: return "PUSH_DONE";
    case Type::complete: return "COMPLETE";
    case Type::heartbeat: return "HEARTBEAT";
    case Type::device_loaded: return "DEVICE_LOADED";
    case Type::go: return "GO";
    case Type::precopy_pages: return "PRECOPY_PAGES";
    case Type::precopy_end: return "PRECOPY_END";
    case Type::stale: return "STALE";
    case Type::precopy_lz4: return "PRECOPY_LZ4";
    case Type::round_end: return "ROUND_END";
    case Type::round_ack: return "ROUND_ACK";
    case Type::rdma_offer: return "RDMA_OFFER";
    case Type::rdma_listen: return "RDMA_LISTEN";
    case Type::rdma_regions: return "RDMA_REGIONS";
    case Type::rdma_ready: return "RDMA_READY";
    case Type::zero_bitmap: return "ZERO_BITMAP";
    case Type::sample_crcs: return "SAMPLE_CRCS";
    case Type::scan_done: return "SCAN_DONE";
    case Type::resume: return "RESUME";
    case Type::lacking: return "LACKING";
    case Type::lacking_end: return "LACKING_END";
    case Type::epoch_begin: return "EPOCH_BEGIN";
    case Type::epoch_pages: return "EPOCH_PAGES";
    case Type::epoch_device: return "EPOCH_DEVICE";
    case Type::epoch_end: return "EPOCH_END";
    case Type::epoch_ack: return "EPOCH_ACK";
    case Type::release: return "RELEASE";
    case Type::invalid: break;
    }
    return "INVALID";
}

bool known_type(std::uint8_t t) noexcept {
    return t != 0 && to_string(static_cast<Type>(t)) != "INVALID";
}

std::string_view to_string(Channel c) noexcept {
    switch (c) {
    case Channel::urgent: return "urgent";
    case Channel::bulk: return "bulk";
    case Channel::replication: return "replication";
    case Channel::invalid: break;
    }
    return "invalid";
}

Result<Header> parse_header(std::span<const std::byte, kHeaderSize> raw, std::string_view where) noexcept {
    const auto magic = get<std::uint32_t>(raw.data());
    if (magic != kMagic)
        return peer_violation(fmt::format("{}: not a lazymig frame: magic {:#010x}, expected {:#010x}",
                                       where, magic, kMagic));
    const auto type = static_cast<std::uint8_t>(raw[4]);
    if (!known_type(type))
        return peer_violation(fmt::format("{}: unknown message type {}", where, type));
    const auto flags = static_cast<std::uint8_t>(raw[5]);
    const auto reserved = get<std::uint16_t>(raw.data() + 6);
    if (flags != 0 || reserved != 0)
        return peer_violation(fmt::format("{}: {} frame has reserved bits set (flags {:#x}, reserved {:#x})",
                                       where, to_string(Type{type}), flags, reserved));
    Header h{.type = Type{type}, .length = get<std::uint32_t>(raw.data() + 8),
             .checksum = get<std::uint32_t>(raw.data() + 12)};
    if (h.length > max_payload(h.type))
        return peer_violation(fmt::format("{}: {} frame of {} bytes exceeds the limit of {}", where,
                                       to_string(h.type), h.length, max_payload(h.type)));
    return h;
}

void write_header(std::span<std::byte, kHeaderSize> out, Type type, std::uint32_t length) noexcept {
    put(out.data(), kMagic);
    out[4] = std::byte{static_cast<std::uint8_t>(type)};
    out[5] = std::byte{0};
    put<std::uint16_t>(out.data() + 6, 0);
    put(out.data() + 8, length);
    put<std::uint32_t>(out.data() + 12, 0);
}

void set_checksum(std::span<std::byte, kHeaderSize> header, std::uint32_t checksum) noexcept {
    put(header.data() + 12, checksum);
}

std::uint32_t frame_checksum(std::span<const std::byte, kHeaderSize> header,
                             std::span<const std::byte> payload) noexcept {
    return crc32c(crc32c(0, header.data(), 12), payload.data(), payload.size());
}

std::uint32_t pages_checksum(std::span<const std::byte, kHeaderSize> header, std::span<const std::byte> meta,
                             std::span<const std::uint32_t> page_crcs) noexcept {
    std::uint32_t c = crc32c(crc32c(0, header.data(), 12), meta.data(), meta.size());
    if constexpr (std::endian::native == std::endian::little)
        return crc32c(c, page_crcs.data(), page_crcs.size_bytes());
    for (auto pc : page_crcs) {
        pc = to_le(pc);
        c = crc32c(c, &pc, sizeof pc);
    }
    return c;
}

// Public enums are translated to and from their wire values, never cast: the API may
// renumber or grow without changing what the wire says.
namespace {

std::uint8_t wire_mode(Mode m) {
    switch (m) {
    case Mode::postcopy: return 1;
    case Mode::precopy: return 2;
    case Mode::hybrid: return 3;
    case Mode::invalid: break;
    }
    return 0;
}
Mode mode_of_wire(std::uint8_t v) {
    switch (v) {
    case 1: return Mode::postcopy;
    case 2: return Mode::precopy;
    case 3: return Mode::hybrid;
    default: return Mode::invalid;
    }
}
std::uint8_t wire_backing(Backing b) {
    switch (b) {
    case Backing::anon: return 1;
    case Backing::memfd: return 2;
    case Backing::hugetlbfs: return 3;
    case Backing::invalid: break;
    }
    return 0;
}
Backing backing_of_wire(std::uint8_t v) {
    switch (v) {
    case 1: return Backing::anon;
    case 2: return Backing::memfd;
    case 3: return Backing::hugetlbfs;
    default: return Backing::invalid;
    }
}

}  // namespace

Frame encode(const Hello& m) {
    return Writer(Type::hello).num(m.version).num(static_cast<std::uint8_t>(m.channel))
        .num(wire_mode(m.mode)).num(m.index).num(m.bulk_channels).num(m.session).finish();
}
Frame encode(const HelloAck& m) { return Writer(Type::hello_ack).num(m.version).finish(); }
Frame encode(const ErrorMsg& m) { return Writer(Type::error).num(m.code).str(m.text).finish(); }
Frame encode(const DeviceState& m) { return Writer(Type::device_state).bytes(m.blob).finish(); }
Frame encode(const PageRequest& m) {
    return Writer(Type::page_request).num(m.region).num(m.count).num(m.first).finish();
}
Frame encode(const RegionTable& m) {
    Writer w(Type::region_table);
    w.num(static_cast<std::uint32_t>(m.regions.size()));
    for (const auto& r : m.regions)
        w.str(r.name).num(r.size).num(r.page_size).num(wire_backing(r.backing));
    return w.finish();
}
Frame encode(const StaleSet& m) {
    Writer w(Type::stale);
    w.num(static_cast<std::uint32_t>(m.runs.size()));
    for (const auto& r : m.runs) w.num(r.region).num(r.count).num(r.first);
    return w.finish();
}
Frame encode(Type type, const RoundMark& m) { return Writer(type).num(m.round).finish(); }
Frame encode(const Resume& m) { return Writer(Type::resume).num(m.version).num(m.session).num(m.bulk_channels).finish(); }
Frame encode(const Lacking& m) {
    Writer w(Type::lacking);
    w.num(static_cast<std::uint32_t>(m.runs.size()));
    for (const auto& r : m.runs) w.num(r.region).num(r.count).num(r.first);
    return w.finish();
}
Frame encode(const LackingEnd& m) { return Writer(Type::lacking_end).num(m.pages).finish(); }
Frame encode_empty(Type type) { return Writer(type).finish(); }

Result<Hello> decode_hello(std::span<const std::byte> payload) {
    Reader r(payload, Type::hello);
    // The version comes first and alone decides compatibility: a newer peer may append
    // fields, so check it before anything else and name both versions.
    LZ_TRY(version, r.num<std::uint32_t>());
    if (version != kVersion)
        return peer_violation(fmt::format("peer speaks protocol version {}, this side speaks {}",
                                       version, kVersion));
    LZ_TRY(channel, r.num<std::uint8_t>());
    LZ_TRY(mode, r.num<std::uint8_t>());
    LZ_TRY(index, r.num<std::uint8_t>());
    LZ_TRY(bulk_channels, r.num<std::uint8_t>());
    LZ_TRY(session, r.num<std::uint64_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (channel == 0 || channel > 3) return peer_violation(fmt::format("HELLO: unknown channel {}", channel));
    if (mode_of_wire(mode) == Mode::invalid) return peer_violation(fmt::format("HELLO: unknown mode {}", mode));
    if (bulk_channels == 0 || bulk_channels > kMaxBulkChannels)
        return peer_violation(fmt::format("HELLO: {} bulk channels (expected 1 to {})", bulk_channels, kMaxBulkChannels));
    if (Channel{channel} != Channel::bulk && index != 0)
        return peer_violation(fmt::format("HELLO: {} channel with index {} (expected 0)", to_string(Channel{channel}), index));
    if (index >= bulk_channels)
        return peer_violation(fmt::format("HELLO: bulk channel index {} of {}", index, bulk_channels));
    return Hello{version, Channel{channel}, mode_of_wire(mode), index, bulk_channels, session};
}

Frame encode(const EpochBegin& m) {
    return Writer(Type::epoch_begin).num(m.epoch).num(m.pages).num(m.device_bytes).finish();
}
Frame encode(const EpochEnd& m) { return Writer(Type::epoch_end).num(m.epoch).num(m.frames).num(m.checksum).finish(); }
Frame encode(const EpochAck& m) { return Writer(Type::epoch_ack).num(m.epoch).finish(); }
Frame encode_epoch_device(std::span<const std::byte> blob) { return Writer(Type::epoch_device).bytes(blob).finish(); }

Result<EpochBegin> decode_epoch_begin(std::span<const std::byte> payload) {
    Reader r(payload, Type::epoch_begin);
    LZ_TRY(epoch, r.num<std::uint64_t>());
    LZ_TRY(pages, r.num<std::uint64_t>());
    LZ_TRY(device, r.num<std::uint64_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (epoch == 0) return peer_violation("EPOCH_BEGIN: epoch 0 (epochs count from 1)");
    if (device > kMaxDeviceState)
        return peer_violation(fmt::format("EPOCH_BEGIN: {} bytes of device state exceed the limit of {}", device,
                                          kMaxDeviceState));
    return EpochBegin{epoch, pages, device};
}

Result<EpochEnd> decode_epoch_end(std::span<const std::byte> payload) {
    Reader r(payload, Type::epoch_end);
    LZ_TRY(epoch, r.num<std::uint64_t>());
    LZ_TRY(frames, r.num<std::uint32_t>());
    LZ_TRY(checksum, r.num<std::uint32_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (epoch == 0) return peer_violation("EPOCH_END: epoch 0 (epochs count from 1)");
    return EpochEnd{epoch, frames, checksum};
}

Result<EpochAck> decode_epoch_ack(std::span<const std::byte> payload) {
    Reader r(payload, Type::epoch_ack);
    LZ_TRY(epoch, r.num<std::uint64_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (epoch == 0) return peer_violation("EPOCH_ACK: epoch 0 (epochs count from 1)");
    return EpochAck{epoch};
}

std::uint32_t epoch_fold(std::uint32_t running, std::uint32_t frame_checksum) noexcept {
    std::array<std::byte, 4> b;
    std::memcpy(b.data(), &frame_checksum, 4);
    return crc32c(running, b.data(), b.size());
}

Result<HelloAck> decode_hello_ack(std::span<const std::byte> payload) {
    Reader r(payload, Type::hello_ack);
    LZ_TRY(version, r.num<std::uint32_t>());
    if (version != kVersion)
        return peer_violation(fmt::format("peer speaks protocol version {}, this side speaks {}",
                                       version, kVersion));
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    return HelloAck{version};
}

Result<ErrorMsg> decode_error(std::span<const std::byte> payload) {
    Reader r(payload, Type::error);
    LZ_TRY(code, r.num<std::uint32_t>());
    LZ_TRY(text, r.str(4096));
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    return ErrorMsg{code, std::move(text)};
}

Result<RegionTable> decode_region_table(std::span<const std::byte> payload) {
    Reader r(payload, Type::region_table);
    LZ_TRY(count, r.num<std::uint32_t>());
    if (count == 0 || count > 64)
        return peer_violation(fmt::format("REGION_TABLE: {} regions (expected 1 to 64)", count));
    RegionTable t;
    for (std::uint32_t i = 0; i < count; ++i) {
        LZ_TRY(name, r.str(255));
        LZ_TRY(size, r.num<std::uint64_t>());
        LZ_TRY(page_size, r.num<std::uint32_t>());
        LZ_TRY(backing, r.num<std::uint8_t>());
        if (backing_of_wire(backing) == Backing::invalid)
            return peer_violation(fmt::format("REGION_TABLE: region {} '{}' has unknown backing {}", i, name, backing));
        t.regions.push_back({std::move(name), size, page_size, backing_of_wire(backing)});
    }
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    return t;
}

Result<PageRequest> decode_page_request(std::span<const std::byte> payload) {
    Reader r(payload, Type::page_request);
    LZ_TRY(region, r.num<std::uint32_t>());
    LZ_TRY(count, r.num<std::uint32_t>());
    LZ_TRY(first, r.num<std::uint64_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (count == 0 || count > kMaxPagesPerFrame)
        return peer_violation(fmt::format("PAGE_REQUEST: count {} (expected 1 to {})", count, kMaxPagesPerFrame));
    return PageRequest{region, count, first};
}

namespace {
// STALE and LACKING: u32 n | n × (u32 region | u32 count | u64 first).
Result<std::vector<StaleRun>> decode_runs(std::span<const std::byte> payload, Type type) {
    Reader r(payload, type);
    LZ_TRY(n, r.num<std::uint32_t>());
    if (n == 0 || n > kMaxStaleRuns)
        return peer_violation(fmt::format("{}: {} runs (expected 1 to {})", to_string(type), n, kMaxStaleRuns));
    std::vector<StaleRun> runs;
    runs.reserve(n);
    for (std::uint32_t i = 0; i < n; ++i) {
        LZ_TRY(region, r.num<std::uint32_t>());
        LZ_TRY(count, r.num<std::uint32_t>());
        LZ_TRY(first, r.num<std::uint64_t>());
        if (count == 0)
            return peer_violation(fmt::format("{}: run {} of region {} has no pages", to_string(type), i, region));
        runs.push_back({region, count, first});
    }
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    return runs;
}
}  // namespace

Result<StaleSet> decode_stale(std::span<const std::byte> payload) {
    LZ_TRY(runs, decode_runs(payload, Type::stale));
    return StaleSet{std::move(runs)};
}
Result<Lacking> decode_lacking(std::span<const std::byte> payload) {
    LZ_TRY(runs, decode_runs(payload, Type::lacking));
    return Lacking{std::move(runs)};
}
Result<LackingEnd> decode_lacking_end(std::span<const std::byte> payload) {
    Reader r(payload, Type::lacking_end);
    LZ_TRY(pages, r.num<std::uint64_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    return LackingEnd{pages};
}
Result<Resume> decode_resume(std::span<const std::byte> payload) {
    Reader r(payload, Type::resume);
    LZ_TRY(version, r.num<std::uint32_t>());
    if (version != kVersion)
        return peer_violation(fmt::format("RESUME: peer speaks version {}, we speak {}", version, kVersion));
    LZ_TRY(session, r.num<std::uint64_t>());
    LZ_TRY(bulk, r.num<std::uint8_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (bulk == 0 || bulk > kMaxBulkChannels)
        return peer_violation(fmt::format("RESUME: {} bulk channels (expected 1 to {})", bulk, kMaxBulkChannels));
    return Resume{version, session, bulk};
}

Result<RoundMark> decode_round(Type type, std::span<const std::byte> payload) {
    Reader r(payload, type);
    LZ_TRY(round, r.num<std::uint32_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (round == 0) return peer_violation(fmt::format("{}: round 0 (rounds count from 1)", to_string(type)));
    return RoundMark{round};
}

RegionTable region_table_of(std::span<const GuestRegion> regions) {
    RegionTable t;
    for (const auto& r : regions)
        t.regions.push_back({r.name, r.size, static_cast<std::uint32_t>(r.page_size), r.backing});
    return t;
}

Result<void> check_region_table(const RegionTable& theirs, std::span<const GuestRegion> ours) {
    if (theirs.regions.size() != ours.size())
        return peer_violation(fmt::format("region table mismatch: the source has {} regions, this side {}",
                                       theirs.regions.size(), ours.size()));
    for (std::size_t i = 0; i < ours.size(); ++i) {
        const auto& t = theirs.regions[i];
        const auto& o = ours[i];
        if (t.name != o.name)
            return peer_violation(fmt::format("region table mismatch: region {} is '{}' here, '{}' at the source",
                                           i, o.name, t.name));
        if (t.size != o.size)
            return peer_violation(fmt::format("region table mismatch: region {} '{}': size {} here, {} at the source",
                                           i, o.name, o.size, t.size));
        if (t.page_size != o.page_size)
            return peer_violation(fmt::format("region table mismatch: region {} '{}': page size {} here, {} at the source",
                                           i, o.name, o.page_size, t.page_size));
    }
    return {};
}

std::uint32_t PagesMeta::nonzero_pages() const {
    std::uint32_t zeros = 0;
    for (std::uint32_t i = 0; i < count / 8; ++i) zeros += std::popcount(zero[i]);
    if (count % 8) zeros += std::popcount(static_cast<std::uint8_t>(zero[count / 8] & ((1u << (count % 8)) - 1)));
    return count - zeros;
}

std::size_t encode_pages_head(std::byte* out, const PagesMeta& meta, std::size_t page_size,
                              std::span<const std::uint32_t> page_crcs, Type type) noexcept {
    const std::size_t meta_len = meta.meta_bytes();
    const auto length = static_cast<std::uint32_t>(meta_len + std::size_t(meta.nonzero_pages()) * page_size);
    auto head = std::span<std::byte, kHeaderSize>(out, kHeaderSize);
    write_header(head, type, length);
    std::byte* m = out + kHeaderSize;
    put(m, meta.region);
    put(m + 4, meta.count);
    put(m + 8, meta.first);
    std::memcpy(m + kPagesMetaFixed, meta.zero.data(), meta.bitmap_bytes());
    set_checksum(head, pages_checksum(head, std::span(m, meta_len), page_crcs));
    return kHeaderSize + meta_len;
}

Result<PagesMeta> decode_pages_fixed(std::span<const std::byte, kPagesMetaFixed> raw,
                                     std::string_view where) noexcept {
    PagesMeta m;
    m.region = get<std::uint32_t>(raw.data());
    m.count = get<std::uint32_t>(raw.data() + 4);
    m.first = get<std::uint64_t>(raw.data() + 8);
    if (m.count == 0 || m.count > kMaxPagesPerFrame)
        return peer_violation(fmt::format("{}: PAGES frame with {} pages (expected 1 to {})", where,
                                       m.count, kMaxPagesPerFrame));
    return m;
}

Result<void> check_pages_length(const PagesMeta& meta, std::uint32_t length, std::size_t page_size,
                                std::string_view where, bool packed) noexcept {
    // Bits past `count` in the bitmap's last byte are padding and must be zero: a frame
    // that sets them means something this version does not understand.
    if (meta.count % 8 && (meta.zero[meta.count / 8] >> (meta.count % 8)) != 0)
        return peer_violation(fmt::format("{}: PAGES frame for {} pages sets zero-bitmap padding bits ({:#04x} in its "
                                       "last bitmap byte)", where, meta.count, meta.zero[meta.count / 8]));
    if (packed) {  // PRECOPY_LZ4: a u32 and 1..page_size bytes per non-zero page
        const std::size_t least = meta.meta_bytes() + std::size_t(meta.nonzero_pages()) * 5;
        const std::size_t most = meta.meta_bytes() + std::size_t(meta.nonzero_pages()) * (4 + page_size);
        if (length < least || length > most)
            return peer_violation(fmt::format("{}: PRECOPY_LZ4 frame length {} is outside {}..{} for {} non-zero pages "
                                           "of {} bytes", where, length, least, most, meta.nonzero_pages(), page_size));
        return {};
    }
    const std::size_t want = meta.meta_bytes() + std::size_t(meta.nonzero_pages()) * page_size;
    if (want != length)
        return peer_violation(fmt::format("{}: PAGES frame length {} does not match {} pages ({} non-zero) "
                                       "of {} bytes (expected {})", where, length, meta.count,
                                       meta.nonzero_pages(), page_size, want));
    return {};
}

}  // namespace lazymig::proto

namespace lazymig::proto {

Frame encode(const RdmaListen& m) { return Writer(Type::rdma_listen).num(m.port).finish(); }
Frame encode(const RdmaRegions& m) {
    Writer w(Type::rdma_regions);
    w.num(static_cast<std::uint32_t>(m.regions.size()));
    for (const auto& r : m.regions) w.num(r.addr).num(r.length).num(r.rkey);
    return w.num(static_cast<std::uint8_t>(m.on_demand)).finish();
}
Frame encode(const ZeroBitmap& m) {
    return Writer(Type::zero_bitmap).num(m.region).num(m.first).num(m.count)
        .bytes(std::as_bytes(std::span(m.bits))).finish();
}
Frame encode(const SampleCrcs& m) {
    Writer w(Type::sample_crcs);
    w.num(m.region).num(static_cast<std::uint32_t>(m.samples.size()));
    for (const auto& s : m.samples) w.num(s.page).num(s.crc);
    return w.finish();
}

Result<RdmaListen> decode_rdma_listen(std::span<const std::byte> payload) {
    Reader r(payload, Type::rdma_listen);
    LZ_TRY(port, r.num<std::uint16_t>());
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    if (port == 0) return peer_violation("RDMA_LISTEN: port 0");
    return RdmaListen{port};
}

Result<RdmaRegions> decode_rdma_regions(std::span<const std::byte> payload) {
    Reader r(payload, Type::rdma_regions);
    LZ_TRY(n, r.num<std::uint32_t>());
    if (n > 4096) return peer_violation(fmt::format("RDMA_REGIONS: {} regions", n));
    RdmaRegions m;
    for (std::uint32_t i = 0; i < n; ++i) {
        LZ_TRY(addr, r.num<std::uint64_t>());
        LZ_TRY(length, r.num<std::uint64_t>());
        LZ_TRY(rkey, r.num<std::uint32_t>());
        if (addr > UINT64_MAX - length)
            return peer_violation(fmt::format("RDMA_REGIONS: region {} at {:#x} + {} wraps", i, addr, length));
        m.regions.push_back({addr, length, rkey});
    }
    LZ_TRY(odp, r.num<std::uint8_t>());
    if (odp > 1) return peer_violation(fmt::format("RDMA_REGIONS: on-demand flag {}", odp));
    m.on_demand = odp;
    if (auto d = r.done(); !d) return std::unexpected(d.error());
    return m;
}

Result<ZeroBitmap> decode_zero_bitmap(std::span<const std::byte> payload) {
    Reader r(payload, Type::zero_bitmap);
    LZ_TRY(region, r.num<std::uint32_t>());
    LZ_TRY(first, r.num<std::uint64_t>());
    LZ_TRY(count, r.num<std::uint32_t>());
    const std::size_t bytes = (std::size_t(count) + 7) / 8;
    if (payload.size() - 16 != bytes)
        return peer_violation(fmt::format("ZERO_BITMAP: {} pages need {} bitmap bytes, the frame has {}", count,
                                          bytes, payload.size() - 16));
    ZeroBitmap m{region, first, count, {}};
    const auto* b = reinterpret_cast<const std::uint8_t*>(payload.data() + 16);
    m.bits.assign(b, b + bytes);
    return m;
}

Result<SampleCrcs> decode_sample_crcs(std::span<const std::byte> payload) {
    Reader r(payload, Type::sample_crcs);
    LZ_TRY(region, r.num<std::uint32_t>());
    LZ_TRY(n, r.num<std::uint32_t>());
    if (std::size_t(n) * 12 != payload.size() - 8)
        return peer_violation(fmt::format("SAMPLE_CRCS: {} samples in {} bytes", n, payload.size() - 8));
    SampleCrcs m{region, {}};
    for (std::uint32_t i = 0; i < n; ++i) {
        LZ_TRY(page, r.num<std::uint64_t>());
        LZ_TRY(crc, r.num<std::uint32_t>());
        m.samples.push_back({page, crc});
    }
    return m;
}

}  // namespace lazymig::proto
