// Receiving pages: verify a PAGES frame whole, then place it.
#include <sys/mman.h>

#include <lz4.h>

#include <fmt/format.h>

#include "pager/pager.hpp"
#include "src/crc32c.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"
#include "src/errors.hpp"

namespace lazymig::pager {
namespace {

// A populated receive buffer: page data lands here once, checked, then placed.
class Staging {
public:
    static Result<Staging> create(std::size_t bytes) {
        void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (p == MAP_FAILED) return LZ_SYS_ERROR("mmap a {} byte receive buffer", bytes);
        Staging s;
        s.data_ = static_cast<std::byte*>(p);
        s.size_ = bytes;
        return s;
    }
    Staging() = default;
    Staging(Staging&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(o.size_) {}
    Staging& operator=(Staging&&) = delete;
    ~Staging() {
        if (data_) ::munmap(data_, size_);
    }
    [[nodiscard]] std::byte* data() const { return data_; }
    [[nodiscard]] std::size_t size() const { return size_; }

private:
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
};

// A PRECOPY_LZ4 payload after its meta: `bytes` of (u32 stored, stored bytes) per
// non-zero page, each unpacked to one page of `dst`. Every length is checked against
// what is left before it is used; a block must decompress to exactly one page.
Result<void> unpack(net::FrameReader& reader, std::size_t bytes, std::uint32_t pages, std::size_t ps, std::byte* dst,
                    std::vector<std::byte>& buf) {
    const std::string& where = reader.where();
    if (buf.size() < bytes) buf.resize(bytes);
    if (auto r = reader.read(buf.data(), bytes); !r) return r;
    std::size_t at = 0;
    for (std::uint32_t i = 0; i < pages; ++i) {
        std::uint32_t stored = 0;
        if (bytes - at < 4) return peer_violation(fmt::format("{}: PRECOPY_LZ4 frame ends before page {}", where, i));
        std::memcpy(&stored, buf.data() + at, 4);  // little-endian hosts only, as the rest of the wire code
        at += 4;
        if (stored == 0 || stored > ps || stored > bytes - at)
            return peer_violation(fmt::format("{}: PRECOPY_LZ4 page {} stores {} bytes ({} left, pages of {})", where, i,
                                              stored, bytes - at, ps));
        std::byte* page = dst + std::size_t(i) * ps;
        if (stored == ps) {
            std::memcpy(page, buf.data() + at, ps);
        } else {
            const int got = LZ4_decompress_safe(reinterpret_cast<const char*>(buf.data() + at), reinterpret_cast<char*>(page),
                                                static_cast<int>(stored), static_cast<int>(ps));
            if (got != static_cast<int>(ps))
                return peer_violation(fmt::format("{}: PRECOPY_LZ4 page {} does not decompress to one page ({})", where,
                                                  i, got));
        }
        at += stored;
    }
    if (at != bytes)
        return peer_violation(fmt::format("{}: PRECOPY_LZ4 frame has {} bytes after its last page", where, bytes - at));
    return {};
}

Result<void> receive_pages(net::FrameReader& reader, Pager& pager, const proto::Header& h, Staging& staging,
                           std::vector<std::uint32_t>& crcs, std::vector<const std::byte*>& ptrs, bool demanded,
                           const bool* precopy_open, std::vector<std::byte>& packed_buf) {
    const std::string& where = reader.where();
    const bool precopy = h.type == proto::Type::precopy_pages || h.type == proto::Type::precopy_lz4;
    const bool packed = h.type == proto::Type::precopy_lz4;
    if (precopy && !(precopy_open && *precopy_open))
        return peer_violation(fmt::format("{}: {} {}", where, proto::to_string(h.type),
                                          precopy_open ? "after PRECOPY_END" : "on a channel that carries no pre-copy"));
    // A link that breaks inside a frame is a lost link (post-copy pauses and recovers),
    // as FrameReader says of one that breaks inside a header.
    auto truncated = [&](const Error& e) -> Error {
        if (e.code == ECONNRESET)
            return Error{0, fmt::format("{}: truncated PAGES frame: the peer closed the connection inside it", where),
                         ErrorClass::transport_lost};
        return e;
    };
    if (h.length < proto::kPagesMetaFixed)
        return logic_error(fmt::format("{}: PAGES frame of {} bytes is shorter than its metadata", where, h.length));
    std::array<std::byte, proto::kPagesMetaFixed> fixed;
    if (auto r = reader.read(fixed.data(), fixed.size()); !r) return std::unexpected(truncated(r.error()));
    auto meta = proto::decode_pages_fixed(fixed, where);
    if (!meta) return std::unexpected(meta.error());
    const auto& regions = pager.regions();
    if (meta->region >= regions.size())
        return logic_error(fmt::format("{}: PAGES frame for region {}, but there are {} regions", where, meta->region,
                                       regions.size()));
    const auto& region = regions[meta->region];
    if (meta->first > region.pages || meta->count > region.pages - meta->first)
        return logic_error(fmt::format("{}: PAGES frame for pages {}..{} of region {} '{}', which has {} pages", where,
                                       meta->first, proto::last_page(meta->first, meta->count), meta->region,
                                       region.guest.name, region.pages));
    if (h.length < meta->meta_bytes())
        return logic_error(fmt::format("{}: PAGES frame of {} bytes is shorter than its metadata", where, h.length));
    if (auto r = reader.read(reinterpret_cast<std::byte*>(meta->zero.data()), meta->bitmap_bytes()); !r)
        return std::unexpected(truncated(r.error()));
    const std::size_t ps = region.guest.page_size;
    if (auto r = proto::check_pages_length(*meta, h.length, ps, where, packed); !r) return std::unexpected(r.error());
    const std::uint32_t nonzero = meta->nonzero_pages();
    if (std::size_t(nonzero) * ps > staging.size())
        return logic_error(fmt::format("{}: PAGES frame carries {} bytes, more than the {} byte receive buffer",
                                       where, std::size_t(nonzero) * ps, staging.size()));
    if (packed) {
        if (auto r = unpack(reader, h.length - meta->meta_bytes(), nonzero, ps, staging.data(), packed_buf); !r)
            return std::unexpected(truncated(r.error()));
    } else if (auto r = reader.read(staging.data(), std::size_t(nonzero) * ps); !r) {
        return std::unexpected(truncated(r.error()));
    }

    // Verify before a single byte reaches the guest.
    for (std::uint32_t i = 0; i < nonzero; ++i) ptrs[i] = staging.data() + std::size_t(i) * ps;
    crc32c_pages(ptrs.data(), nonzero, ps, crcs.data());
    std::array<std::byte, proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8> meta_raw;
    std::memcpy(meta_raw.data(), fixed.data(), fixed.size());
    std::memcpy(meta_raw.data() + fixed.size(), meta->zero.data(), meta->bitmap_bytes());
    const auto sum = proto::pages_checksum(reader.raw_header(), std::span(meta_raw.data(), meta->meta_bytes()),
                                           std::span(crcs.data(), nonzero));
    if (sum != h.checksum)
        return logic_error(fmt::format("{}: PAGES frame checksum mismatch for region {} pages {}..{} (got {:#010x}, "
                                       "computed {:#010x}); the frame was refused and none of its pages placed",
                                       where, meta->region, meta->first, meta->first + meta->count - 1, h.checksum, sum));
    if (int e = failpoint::check(demanded ? "pager_urgent_before_place" : "pager_bulk_before_place", meta->region,
                                 meta->first, meta->count))
        return sys_error(fmt::format("{}: failpoint before placing", where), e);
    const ZeroBits zero{std::span<const std::uint8_t>(meta->zero.data(), meta->bitmap_bytes())};
    auto placed = precopy
                      ? pager.precopy(meta->region, meta->first, meta->count, zero, staging.data())
                      : pager.place(meta->region, meta->first, meta->count, zero, staging.data(), demanded);
    if (!placed) return std::unexpected(placed.error());
    return {};
}

}  // namespace

Result<void> receive_loop(net::FrameReader& reader, Pager& pager, bool demanded, const ControlHandler& on_control,
                          const bool* precopy_open) {
    std::size_t largest = 4096;
    for (const auto& r : pager.regions()) largest = std::max(largest, r.guest.page_size);
    const std::size_t bytes = std::min(proto::kMaxPagesPayload, largest * proto::kMaxPagesPerFrame);
    auto staging = Staging::create(bytes);
    if (!staging) return std::unexpected(staging.error());
    std::vector<std::uint32_t> crcs(proto::kMaxPagesPerFrame);
    std::vector<const std::byte*> ptrs(proto::kMaxPagesPerFrame);
    std::vector<std::byte> packed;  // PRECOPY_LZ4 payloads, grown to the largest seen
    for (;;) {
        auto h = reader.next();
        if (!h) return std::unexpected(h.error());
        if (!*h) return {};  // closed between frames; the caller decides if that was expected
        const auto type = (*h)->type;
        if (type == proto::Type::pages || type == proto::Type::precopy_pages || type == proto::Type::precopy_lz4) {
            if (auto r = receive_pages(reader, pager, **h, *staging, crcs, ptrs, demanded, precopy_open, packed); !r)
                return std::unexpected(r.error());
            continue;
        }
        auto payload = reader.read_control(**h);
        if (!payload) return std::unexpected(payload.error());
        auto go_on = on_control(**h, std::move(*payload));
        if (!go_on) return std::unexpected(go_on.error());
        if (!*go_on) return {};
    }
}

}  // namespace lazymig::pager
