// The source's applier of back-replicated epochs; the contract is in epoch_applier.hpp.
#include "precopy/epoch_applier.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <optional>

#include <fmt/format.h>

#include "src/crc32c.hpp"
#include "src/errors.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"
#include "src/protocol.hpp"

namespace lazymig::source {
namespace {
constexpr std::size_t kIovMax = 1024;  // IOV_MAX: runs per process_vm_writev
}

EpochApplier::EpochApplier(std::span<const GuestRegion> regions, std::vector<std::byte> device_state,
                           std::size_t max_device_state)
    : regions_(regions.begin(), regions.end()), max_device_state_(max_device_state),
      checkpoint_(std::move(device_state)) {
    for (const auto& r : regions_) total_bytes_ += r.size;
    crcs_.resize(proto::kMaxPagesPerFrame);
    ptrs_.resize(proto::kMaxPagesPerFrame);
}

EpochApplier::~EpochApplier() {
    if (store_) ::munmap(store_, store_size_);
}

std::vector<std::byte> EpochApplier::checkpoint() const {
    std::lock_guard lock(mu_);
    return checkpoint_;
}

Result<void> EpochApplier::reserve(std::size_t bytes) {
    if (bytes <= store_size_) return {};
    if (store_) ::munmap(store_, store_size_);
    store_ = nullptr;
    store_size_ = 0;
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) return LZ_SYS_ERROR("source: mmap a {} byte epoch store", bytes);
    store_ = static_cast<std::byte*>(p);
    store_size_ = bytes;
    return {};
}

Result<void> EpochApplier::receive_pages(net::FrameReader& reader, const proto::Header& h, std::uint64_t announced) {
    const std::string& where = reader.where();
    if (h.length < proto::kPagesMetaFixed)
        return peer_violation(fmt::format("{}: EPOCH_PAGES frame of {} bytes is shorter than its metadata", where, h.length));
    std::array<std::byte, proto::kPagesMetaFixed + proto::kMaxPagesPerFrame / 8> meta_raw;
    if (auto r = reader.read(meta_raw.data(), proto::kPagesMetaFixed); !r) return r;
    auto meta = proto::decode_pages_fixed(std::span<const std::byte, proto::kPagesMetaFixed>(meta_raw.data(),
                                                                                            proto::kPagesMetaFixed), where);
    if (!meta) return std::unexpected(meta.error());
    if (meta->region >= regions_.size())
        return peer_violation(fmt::format("{}: EPOCH_PAGES for region {}, but there are {} regions", where, meta->region,
                                          regions_.size()));
    const auto& g = regions_[meta->region];
    const std::uint64_t rpages = g.size / g.page_size;
    if (meta->first > rpages || meta->count > rpages - meta->first)
        return peer_violation(fmt::format("{}: EPOCH_PAGES for pages {}..{} of region {} '{}', which has {} pages", where,
                                          meta->first, proto::last_page(meta->first, meta->count), meta->region, g.name,
                                          rpages));
    if (h.length < meta->meta_bytes())
        return peer_violation(fmt::format("{}: EPOCH_PAGES frame of {} bytes is shorter than its metadata", where, h.length));
    if (auto r = reader.read(meta_raw.data() + proto::kPagesMetaFixed, meta->bitmap_bytes()); !r) return r;
    std::memcpy(meta->zero.data(), meta_raw.data() + proto::kPagesMetaFixed, meta->bitmap_bytes());
    const std::size_t ps = g.page_size;
    if (auto r = proto::check_pages_length(*meta, h.length, ps, where); !r) return r;
    if (pages_ + meta->count > announced)
        return peer_violation(fmt::format("{}: EPOCH_PAGES carry more than the {} pages EPOCH_BEGIN announced", where,
                                          announced));
    const std::size_t bytes = std::size_t(meta->count) * ps;
    if (used_ + bytes > store_size_)
        return logic_error(fmt::format("{}: epoch store of {} bytes is full", where, store_size_));
    std::byte* dst = store_ + used_;
    // Zero pages travel as bits: their place in the store is zeroed, the others read.
    const std::uint32_t nonzero = meta->nonzero_pages();
    if (nonzero == meta->count) {
        if (auto r = reader.read(dst, bytes); !r) return r;
    } else {
        for (std::uint32_t i = 0; i < meta->count; ++i) {
            std::byte* page = dst + std::size_t(i) * ps;
            if (meta->is_zero(i)) std::memset(page, 0, ps);
            else if (auto r = reader.read(page, ps); !r) return r;
        }
    }
    std::uint32_t k = 0;
    for (std::uint32_t i = 0; i < meta->count; ++i)
        if (!meta->is_zero(i)) ptrs_[k++] = dst + std::size_t(i) * ps;
    crc32c_pages(ptrs_.data(), k, ps, crcs_.data());
    const auto sum = proto::pages_checksum(reader.raw_header(), std::span(meta_raw.data(), meta->meta_bytes()),
                                           std::span(crcs_.data(), k));
    if (sum != h.checksum)
        return peer_violation(fmt::format("{}: EPOCH_PAGES checksum mismatch for region {} pages {}..{} (got {:#010x}, "
                                          "computed {:#010x}); the epoch is refused and none of it applied",
                                          where, meta->region, meta->first, proto::last_page(meta->first, meta->count),
                                          h.checksum, sum));
    pieces_.push_back({meta->region, meta->first, meta->count, used_});
    used_ += bytes;
    pages_ += meta->count;
    return {};
}

// Writes every piece into guest RAM through the kernel, up to kIovMax runs a call.
Result<void> EpochApplier::apply() {
    std::array<iovec, kIovMax> local, remote;
    std::size_t n = 0, bytes = 0;
    auto flush = [&]() -> Result<void> {
        if (n == 0) return {};
        const ssize_t w = ::process_vm_writev(::getpid(), local.data(), n, remote.data(), n, 0);
        if (w < 0) return LZ_SYS_ERROR("source: process_vm_writev of {} runs of an epoch into guest RAM", n);
        if (static_cast<std::size_t>(w) != bytes)
            return logic_error(fmt::format("source: process_vm_writev wrote {} of {} bytes of an epoch", w, bytes));
        n = bytes = 0;
        return {};
    };
    for (const auto& p : pieces_) {
        const auto& g = regions_[p.region];
        const std::size_t len = p.count * g.page_size;
        local[n] = {store_ + p.offset, len};
        remote[n] = {static_cast<std::byte*>(g.host) + p.first * g.page_size, len};
        bytes += len;
        if (++n == kIovMax)
            if (auto f = flush(); !f) return f;
    }
    return flush();
}

Result<void> EpochApplier::run(net::FrameReader& reader, const std::function<void()>& on_ack_sent) {
    const std::string& where = reader.where();
    reader.set_max_device_state(max_device_state_);
    std::optional<proto::EpochBegin> open;  // the epoch being received
    bool device = false;
    std::uint32_t frames = 0, sum = 0;
    auto lost = [&](Error e) -> Result<void> {
        if (open) {
            LZ_LOG(warn, "source_epoch_discarded", "epoch={} pages_received={} of {}", open->epoch, pages_, open->pages);
            e.context += fmt::format("; epoch {} was not whole and is discarded", open->epoch);
        }
        return std::unexpected(std::move(e));
    };
    for (;;) {
        auto h = reader.next();
        if (!h) return lost(h.error());
        if (!*h) {
            if (!open) return {};
            return lost(Error{ECONNRESET, fmt::format("{}: the destination closed the connection", where),
                              ErrorClass::transport_lost});
        }
        const auto type = (*h)->type;
        if (type == proto::Type::epoch_pages) {
            if (!open || device)
                return peer_violation(fmt::format("{}: EPOCH_PAGES {}", where, open ? "after EPOCH_DEVICE" : "outside an epoch"));
            if (auto r = receive_pages(reader, **h, open->pages); !r) return lost(r.error());
            sum = proto::epoch_fold(sum, (*h)->checksum);
            ++frames;
            continue;
        }
        auto payload = reader.read_control(**h);
        if (!payload) return lost(payload.error());
        switch (type) {
        case proto::Type::error: return lost(net::peer_error(*payload, where));
        case proto::Type::epoch_begin: {
            if (open) return peer_violation(fmt::format("{}: EPOCH_BEGIN inside epoch {}", where, open->epoch));
            auto b = proto::decode_epoch_begin(*payload);
            if (!b) return std::unexpected(b.error().wrap(where));
            if (b->epoch != committed() + 1)
                return peer_violation(fmt::format("{}: EPOCH_BEGIN {} after epoch {}", where, b->epoch, committed()));
            std::uint64_t most = 0;
            for (const auto& g : regions_) most += g.size / g.page_size;
            if (b->pages > most)
                return peer_violation(fmt::format("{}: EPOCH_BEGIN {} announces {} pages; guest RAM has {}", where,
                                                  b->epoch, b->pages, most));
            if (b->device_bytes > max_device_state_)
                return peer_violation(fmt::format("{}: EPOCH_BEGIN {} announces {} bytes of device state (at most {})",
                                                  where, b->epoch, b->device_bytes, max_device_state_));
            std::size_t largest = 4096;
            for (const auto& g : regions_) largest = std::max(largest, g.page_size);
            if (auto r = reserve(std::min<std::size_t>(b->pages * largest, total_bytes_)); !r) return r;
            open = *b;
            device = false;
            frames = sum = 0;
            pages_ = used_ = 0;
            pieces_.clear();
            continue;
        }
        case proto::Type::epoch_device:
            if (!open || device)
                return peer_violation(fmt::format("{}: EPOCH_DEVICE {}", where, open ? "twice in an epoch" : "outside an epoch"));
            if (payload->size() != open->device_bytes)
                return peer_violation(fmt::format("{}: EPOCH_DEVICE of {} bytes, EPOCH_BEGIN announced {}", where,
                                                  payload->size(), open->device_bytes));
            device_ = std::move(*payload);
            device = true;
            sum = proto::epoch_fold(sum, (*h)->checksum);
            ++frames;
            continue;
        case proto::Type::epoch_end: {
            if (!open) return peer_violation(fmt::format("{}: EPOCH_END outside an epoch", where));
            auto e = proto::decode_epoch_end(*payload);
            if (!e) return std::unexpected(e.error().wrap(where));
            if (e->epoch != open->epoch || !device || e->frames != frames || e->checksum != sum || pages_ != open->pages)
                return peer_violation(fmt::format(
                    "{}: EPOCH_END {} does not close epoch {} as received ({} frames, checksum {:#010x}, {} of {} pages, "
                    "device state {}; the end says {} frames, checksum {:#010x}): the epoch is refused and none of it "
                    "applied", where, e->epoch, open->epoch, frames, sum, pages_, open->pages,
                    device ? "received" : "missing", e->frames, e->checksum));
            if (int fe = failpoint::check("source_epoch_apply", 0, open->epoch, static_cast<std::uint32_t>(pages_)))
                return lost(Error{fe, fmt::format("source: failpoint source_epoch_apply at epoch {}", open->epoch)});
            const auto t0 = std::chrono::steady_clock::now();
            if (auto a = apply(); !a) return std::unexpected(a.error());
            {
                std::lock_guard lock(mu_);
                checkpoint_.swap(device_);
            }
            committed_.store(open->epoch, std::memory_order_release);
            pages_applied_.add(pages_);
            apply_.record(static_cast<std::uint64_t>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count()));
            LZ_LOG(debug, "source_epoch_applied", "epoch={} pages={} device_bytes={}", open->epoch, pages_,
                   open->device_bytes);
            const std::uint64_t n = open->epoch;
            open.reset();
            {
                std::lock_guard lock(send_mu_);
                if (auto s = net::send_frame(reader.channel(), proto::encode(proto::EpochAck{n})); !s) return s;
            }
            if (on_ack_sent) on_ack_sent();
            continue;
        }
        default:
            return peer_violation(fmt::format("{}: unexpected {} on the replication channel", where, proto::to_string(type)));
        }
    }
}

Result<void> EpochApplier::release(net::Channel& channel) {
    static const proto::Frame frame = proto::encode_empty(proto::Type::release);
    std::lock_guard lock(send_mu_);
    return net::send_frame(channel, frame);
}

}  // namespace lazymig::source
