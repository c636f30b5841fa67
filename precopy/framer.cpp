// PAGES frames from a snapshot in a staging buffer; the sent map; the hint queue.
#include <sys/mman.h>

#include <cstring>

#include <fmt/format.h>

#include "precopy/source.hpp"
#include "src/crc32c.hpp"

namespace lazymig::source {
namespace {

// Reads until the first non-zero byte: a data page usually stops in its first line.
bool is_zero_page(const std::byte* p, std::size_t len) {
    const auto* w = reinterpret_cast<const std::uint64_t*>(p);
    for (std::size_t i = 0; i < len / 8; i += 8) {
        if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) != 0) return false;
    }
    return true;
}

}  // namespace

SentMap::SentMap(std::span<const GuestRegion> regions) {
    for (const auto& r : regions) {
        pages_.push_back(r.size / r.page_size);
        sent_.push_back(std::make_unique<std::atomic<std::uint8_t>[]>(pages_.back()));
    }
}

std::size_t SentMap::bytes() const {
    std::size_t n = 0;
    for (auto p : pages_) n += p;
    return n;
}

Result<StagingBuffer> StagingBuffer::create(std::size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        const int e = errno;
        return sys_error(fmt::format("mmap of a {}-byte staging buffer", bytes), e);
    }
    StagingBuffer b;
    b.data_ = static_cast<std::byte*>(p);
    b.size_ = bytes;
    return b;
}

StagingBuffer& StagingBuffer::operator=(StagingBuffer&& o) noexcept {
    if (this != &o) {
        if (data_) ::munmap(data_, size_);
        data_ = std::exchange(o.data_, nullptr);
        size_ = std::exchange(o.size_, 0);
    }
    return *this;
}

StagingBuffer::~StagingBuffer() {
    if (data_) ::munmap(data_, size_);
}

Result<std::unique_ptr<PageFramer>> PageFramer::create(std::span<const GuestRegion> regions, PageReader& reader,
                                                       std::size_t staging_bytes) {
    std::size_t biggest = 0;
    for (const auto& r : regions) biggest = std::max(biggest, r.page_size);
    auto staging = StagingBuffer::create(std::max(staging_bytes, biggest));
    if (!staging) return std::unexpected(staging.error().wrap("page framer"));
    return std::unique_ptr<PageFramer>(new PageFramer(regions, reader, std::move(*staging)));
}

std::uint32_t PageFramer::max_pages(std::uint32_t region) const {
    const std::size_t by_staging = staging_.size() / regions_[region].page_size;
    return static_cast<std::uint32_t>(std::min<std::size_t>(by_staging, proto::kMaxPagesPerFrame));
}

Result<BuiltFrame> PageFramer::build(std::uint32_t region, std::uint64_t first, std::uint32_t count, proto::Type type) {
    if (region >= regions_.size() || count == 0 || count > max_pages(region))
        return logic_error(fmt::format("page framer: {} pages of region {} do not fit one frame", count, region));
    // The snapshot: from here on the guest's RAM is not looked at again for this frame.
    if (auto r = reader_.read(region, first, count, staging_.data()); !r) return std::unexpected(r.error());
    const std::size_t ps = regions_[region].page_size;
    proto::PagesMeta meta;
    meta.region = region;
    meta.first = first;
    meta.count = count;
    std::size_t nonzero = 0, niov = 1;
    for (std::uint32_t i = 0; i < count; ++i) {
        std::byte* p = staging_.data() + std::size_t(i) * ps;
        if (is_zero_page(p, ps)) {
            meta.set_zero(i);
            continue;
        }
        ptrs_[nonzero++] = p;
        iovec& last = iov_[niov - 1];
        if (niov > 1 && static_cast<std::byte*>(last.iov_base) + last.iov_len == p)
            last.iov_len += ps;
        else
            iov_[niov++] = iovec{p, ps};
    }
    crc32c_pages(ptrs_.data(), nonzero, ps, crcs_.data());
    nonzero_ = nonzero;
    const std::size_t head = proto::encode_pages_head(head_.data(), meta, ps, std::span(crcs_.data(), nonzero), type);
    iov_[0] = iovec{head_.data(), head};
    return BuiltFrame{std::span<const iovec>(iov_.data(), niov), count - nonzero, head + nonzero * ps};
}

void HintQueue::push(std::uint32_t region, std::uint64_t page) {
    std::lock_guard lock(mu_);
    if (size_ == ring_.size()) {  // drop the oldest
        head_ = (head_ + 1) % ring_.size();
        --size_;
    }
    ring_[(head_ + size_) % ring_.size()] = {region, page};
    ++size_;
}

bool HintQueue::pop(std::uint32_t* region, std::uint64_t* page) {
    std::lock_guard lock(mu_);
    if (size_ == 0) return false;
    // Newest first: the most recent fault is where the guest is now.
    const auto& [r, p] = ring_[(head_ + size_ - 1) % ring_.size()];
    *region = r;
    *page = p;
    --size_;
    return true;
}

void DemandGate::leave() noexcept {
    std::uint32_t v = state_.load(std::memory_order_relaxed), next;
    do {
        next = v - 1;
        if ((next & kCount) == 0) next = (next & ~kEpoch) | ((next + kEpochOne) & kEpoch);  // a new clear epoch
    } while (!state_.compare_exchange_weak(v, next, std::memory_order_acq_rel, std::memory_order_relaxed));
    if ((next & kCount) == 0) state_.notify_all();
}

bool DemandGate::wait_clear() noexcept {
    const std::uint32_t seen = state_.load(std::memory_order_acquire);
    for (std::uint32_t v = seen;; v = state_.load(std::memory_order_acquire)) {
        if (v & kShut) return false;
        if ((v & kCount) == 0 || (v & kEpoch) != (seen & kEpoch)) return true;
        // Sleeps in the kernel until leave() or shutdown() changes the word.
        state_.wait(v, std::memory_order_acquire);
    }
}

}  // namespace lazymig::source
