// PAGES frames straight from guest RAM; the sent map; the hint queue.
#include <cstring>

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

std::span<const iovec> PageFramer::build(std::uint32_t region, std::uint64_t first, std::uint32_t count,
                                         std::uint64_t* zero_pages, std::size_t* bytes) {
    const GuestRegion& g = regions_[region];
    const std::size_t ps = g.page_size;
    auto* base = static_cast<std::byte*>(g.host);
    proto::PagesMeta meta;
    meta.region = region;
    meta.first = first;
    meta.count = count;
    std::size_t nonzero = 0, niov = 1;
    for (std::uint32_t i = 0; i < count; ++i) {
        std::byte* p = base + (first + i) * ps;
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
    const std::size_t head = proto::encode_pages_head(head_.data(), meta, ps, std::span(crcs_.data(), nonzero));
    iov_[0] = iovec{head_.data(), head};
    *zero_pages = count - nonzero;
    *bytes = head + nonzero * ps;
    return std::span(iov_.data(), niov);
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

}  // namespace lazymig::source
