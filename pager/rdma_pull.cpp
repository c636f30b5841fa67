// The destination's RDMA pull: fault reads and the bulk sweep. See rdma_pull.hpp.
#include "pager/rdma_pull.hpp"

#include <sys/mman.h>

#include <cstring>

#include <fmt/format.h>

#include "src/crc32c.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::pager {
namespace {

constexpr std::uint32_t kFaultSlots = 64;      // fault reads in flight (sq depth bound)
constexpr std::size_t kFaultSlotBytes = 256 << 10;  // one fault read at most (64 pages)
constexpr std::size_t kMaxWaiting = 4096;      // fault pieces waiting for a slot
constexpr std::uint32_t kBulkInFlight = 4;     // bulk batches outstanding
// 1 MiB per batch: a few READs of runs, one completion; under TCG soft-RoCE reads
// reached the same rate from 256 KiB up, and 4 in flight keep the link busy.
constexpr std::size_t kBatchBytes = 1 << 20;
constexpr std::uint32_t kQueueDepth = 1024;
constexpr std::chrono::milliseconds kSetupTimeout{30'000};


}  // namespace

RdmaPuller::RdmaPuller(Pager& pager, int stop_fd, std::function<void(const Error&)> on_error)
    : pager_(pager), stop_fd_(stop_fd), on_error_(std::move(on_error)) {}

RdmaPuller::~RdmaPuller() {
    stop();
    // MRs go before the memory they cover; the QPs before the domain (member order).
    staging_mr_ = {};
    for (auto& t : targets_) {
        t.mr = {};
        if (t.base) ::munmap(t.base, t.map_len);
    }
    if (staging_) ::munmap(staging_, staging_len_);
}

void RdmaPuller::stop() {
    if (fault_thread_.joinable()) fault_thread_.join();
    if (bulk_thread_.joinable()) bulk_thread_.join();
}

void RdmaPuller::fail(const Error& e) {
    if (failed_.exchange(true)) return;
    LZ_LOG(error, "rdma_pull_failed", "{}", e.message());
    if (on_error_) on_error_(e);
}

RdmaPullReport RdmaPuller::report() const {
    return {device_, source_odp_, fault_reads_.load(), bulk_reads_.load(), samples_checked_.load()};
}

Result<std::unique_ptr<RdmaPuller>> RdmaPuller::setup(Pager& pager, net::FrameReader& urgent, const Send& send,
                                                      const std::string& host, std::uint64_t session, int stop_fd,
                                                      std::function<void(const Error&)> on_error) {
    std::unique_ptr<RdmaPuller> p(new RdmaPuller(pager, stop_fd, std::move(on_error)));
    if (auto offer = urgent.expect(proto::Type::rdma_offer); !offer)
        return std::unexpected(offer.error().wrap("this destination pulls by RDMA (rdma: URI)"));
    auto l = net::rdma::listen(host, 0, stop_fd);
    if (!l) return std::unexpected(l.error().wrap("destination"));
    p->listener_ = std::move(*l);
    if (auto r = send(proto::encode(proto::RdmaListen{p->listener_->port()})); !r) return std::unexpected(r.error());
    // Each role once, with this migration's session: a stranger's request is rejected.
    using net::rdma::Role;
    auto check = [&](Role want) {
        return [&, want](std::span<const std::byte> priv) -> Result<void> {
            const auto ours = net::rdma::private_data(want, session);
            if (priv.size() < ours.size() || std::memcmp(priv.data(), ours.data(), ours.size()) != 0)
                return peer_violation(fmt::format("rdma connect request that is not this migration's {} queue pair",
                                                  want == Role::fault ? "fault" : "bulk"));
            return {};
        };
    };
    auto fq = p->listener_->accept(check(Role::fault), nullptr, kQueueDepth, "rdma fault queue pair", kSetupTimeout);
    if (!fq) return std::unexpected(fq.error().wrap("destination"));
    p->fault_qp_ = std::move(*fq);
    auto bq = p->listener_->accept(check(Role::bulk), p->fault_qp_->domain(), kQueueDepth, "rdma bulk queue pair",
                                   kSetupTimeout);
    if (!bq) return std::unexpected(bq.error().wrap("destination"));
    p->bulk_qp_ = std::move(*bq);
    p->device_ = net::rdma::device_name(*p->fault_qp_->domain());

    auto raw = urgent.expect(proto::Type::rdma_regions);
    if (!raw) return std::unexpected(raw.error());
    auto regions = proto::decode_rdma_regions(*raw);
    if (!regions) return std::unexpected(regions.error().wrap(urgent.where()));
    const auto& ours = pager.regions();
    if (regions->regions.size() != ours.size())
        return peer_violation(fmt::format("{}: RDMA_REGIONS lists {} regions, the table had {}", urgent.where(),
                                          regions->regions.size(), ours.size()));
    p->source_odp_ = regions->on_demand;
    p->targets_.resize(ours.size());
    for (std::size_t i = 0; i < ours.size(); ++i) {
        if (regions->regions[i].length != ours[i].guest.size)
            return peer_violation(fmt::format("{}: RDMA_REGIONS: region {} '{}' registered with {} bytes, it has {}",
                                              urgent.where(), i, ours[i].guest.name, regions->regions[i].length,
                                              ours[i].guest.size));
        p->targets_[i].remote = regions->regions[i];
    }
    if (auto r = p->register_local(); !r) return std::unexpected(r.error().wrap("destination"));
    if (auto r = send(proto::encode_empty(proto::Type::rdma_ready)); !r) return std::unexpected(r.error());
    LZ_LOG(info, "rdma_pull_ready", "device={} source_on_demand={}", p->device_, p->source_odp_);
    try {
        p->fault_thread_ = std::thread([raw = p.get()] { raw->fault_completions(); });
    } catch (const std::system_error& e) {
        return sys_error("destination: starting the RDMA fault completion thread", e.code().value());
    }
    return p;
}

// File-backed regions: a second, shared mapping of the file, registered: READs land in
// the file's pages (the page cache), which UFFDIO_CONTINUE then maps. Registration pins
// them; the file was allocated whole by Pager::create. Anonymous regions: staging.
Result<void> RdmaPuller::register_local() {
    const auto& d = fault_qp_->domain();
    std::size_t max_ps = 4096;
    bool any_anon = false;
    for (std::size_t i = 0; i < targets_.size(); ++i) {
        const auto& r = pager_.regions()[i];
        max_ps = std::max<std::size_t>(max_ps, r.guest.page_size);
        if (!r.file_backed()) {
            any_anon = true;
            continue;
        }
        void* m = ::mmap(nullptr, r.guest.size, PROT_READ | PROT_WRITE, MAP_SHARED, r.guest.fd,
                         static_cast<off_t>(r.guest.fd_offset));
        if (m == MAP_FAILED) return sys_error(fmt::format("mmap of region '{}''s file for RDMA", r.guest.name));
        targets_[i].base = static_cast<std::byte*>(m);
        targets_[i].map_len = r.guest.size;
        auto mr = net::rdma::register_memory(d, m, r.guest.size, false, false, fmt::format("region '{}'", r.guest.name));
        if (!mr) return std::unexpected(mr.error());
        targets_[i].mr = std::move(*mr);
    }
    slot_bytes_ = std::max(kFaultSlotBytes, max_ps);
    batch_bytes_ = std::max(kBatchBytes, max_ps);
    slots_.resize(kFaultSlots);
    for (std::uint32_t s = 0; s < kFaultSlots; ++s) free_slots_.push_back(kFaultSlots - 1 - s);
    if (!any_anon) return {};
    staging_len_ = kFaultSlots * slot_bytes_ + kBulkInFlight * batch_bytes_;
    void* m = ::mmap(nullptr, staging_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (m == MAP_FAILED) return sys_error(fmt::format("mmap {} bytes of RDMA staging", staging_len_));
    staging_ = static_cast<std::byte*>(m);
    auto mr = net::rdma::register_memory(d, m, staging_len_, false, false, "the RDMA staging buffer");
    if (!mr) return std::unexpected(mr.error());
    staging_mr_ = std::move(*mr);
    return {};
}

// ── faults ───────────────────────────────────────────────────────────────────────────

Result<void> RdmaPuller::request(std::uint32_t ri, std::uint64_t first, std::uint32_t count) {
    hint_.store(std::uint64_t(ri) << 48 | first, std::memory_order_relaxed);
    const auto& r = pager_.regions()[ri];
    const std::uint32_t per_piece = static_cast<std::uint32_t>(slot_bytes_ / r.guest.page_size);
    std::lock_guard lock(mu_);
    // Pages a bulk batch claimed meanwhile are its to place; read only our own runs.
    for (std::uint64_t p = first, end = first + count; p < end;) {
        if (!pager_.claim(ri, p)) {
            ++p;
            continue;
        }
        std::uint64_t e = p + 1;
        while (e < end && e - p < per_piece && pager_.claim(ri, e)) ++e;
        const Piece piece{ri, p, static_cast<std::uint32_t>(e - p)};
        if (free_slots_.empty()) {
            if (waiting_.size() >= kMaxWaiting)
                return std::unexpected(Error{ENOBUFS, fmt::format("rdma: more than {} fault reads wait for a slot",
                                                                  kMaxWaiting)});
            waiting_.push_back(piece);
        } else {
            const std::uint32_t slot = free_slots_.back();
            free_slots_.pop_back();
            if (auto r2 = post_fault(piece, slot); !r2) return r2;
        }
        p = e;
    }
    return {};
}

Result<void> RdmaPuller::post_fault(const Piece& p, std::uint32_t slot) {
    slots_[slot] = p;
    const auto& r = pager_.regions()[p.ri];
    const auto& t = targets_[p.ri];
    const std::size_t ps = r.guest.page_size;
    net::rdma::ReadWr wr{};
    if (t.base) {
        wr.local = reinterpret_cast<std::uint64_t>(t.base + p.first * ps);
        wr.lkey = t.mr.lkey();
    } else {
        wr.local = reinterpret_cast<std::uint64_t>(staging_ + slot * slot_bytes_);
        wr.lkey = staging_mr_.lkey();
    }
    wr.len = static_cast<std::uint32_t>(p.count * ps);
    wr.remote = t.remote.addr + p.first * ps;
    wr.rkey = t.remote.rkey;
    fault_reads_.fetch_add(1, std::memory_order_relaxed);
    if (auto r2 = fault_qp_->post_reads(std::span(&wr, 1), slot); !r2)
        return std::unexpected(r2.error().wrap(fmt::format("rdma: fault read of region {} pages {}+{}", p.ri, p.first, p.count)));
    return {};
}

void RdmaPuller::fault_completions() {
    std::array<net::rdma::Completion, 16> wc;
    for (;;) {
        auto n = fault_qp_->poll(wc);
        if (!n) return fail(n.error());
        if (*n == 0) {
            auto w = fault_qp_->wait(std::chrono::milliseconds(-1));
            if (!w) {
                if (w.error().code != ECANCELED && !pager_.complete()) fail(w.error());
                return;
            }
            continue;
        }
        for (std::size_t i = 0; i < *n; ++i) {
            Piece p;
            {
                std::lock_guard lock(mu_);
                p = slots_[wc[i].wr_id];
            }
            const auto& r = pager_.regions()[p.ri];
            if (wc[i].status != 0) {
                for (std::uint64_t k = p.first; k < p.first + p.count; ++k) pager_.unclaim(p.ri, k);
                return fail(Error{EIO,
                                  fmt::format("{}: RDMA READ of region {} '{}' pages {}+{} failed: {}",
                                              fault_qp_->where(), p.ri, r.guest.name, p.first, p.count,
                                              wc[i].status_text),
                                  ErrorClass::transport_lost});
            }
            static const std::array<std::uint8_t, 128> kNoZeros{};
            const std::byte* data = targets_[p.ri].base ? nullptr : staging_ + wc[i].wr_id * slot_bytes_;
            auto m = pager_.map_claimed(p.ri, p.first, p.count, ZeroBits{kNoZeros}, data, true);
            if (!m) return fail(m.error().wrap("rdma: placing a fault read"));
            std::lock_guard lock(mu_);
            if (waiting_.empty()) {
                free_slots_.push_back(static_cast<std::uint32_t>(wc[i].wr_id));
            } else {
                const Piece next = waiting_.front();
                waiting_.pop_front();
                if (auto r2 = post_fault(next, static_cast<std::uint32_t>(wc[i].wr_id)); !r2) return fail(r2.error());
            }
        }
    }
}

// ── bulk ─────────────────────────────────────────────────────────────────────────────

Result<bool> RdmaPuller::on_frame(const proto::Header& h, std::span<const std::byte> payload, std::string_view where) {
    const auto& regions = pager_.regions();
    if (zero_.empty()) {
        zero_.resize(regions.size());
        samples_.resize(regions.size());
        for (std::size_t i = 0; i < regions.size(); ++i) zero_[i].assign((regions[i].pages + 7) / 8, 0);
    }
    switch (h.type) {
    case proto::Type::zero_bitmap: {
        auto z = proto::decode_zero_bitmap(payload);
        if (!z) return std::unexpected(z.error().wrap(where));
        if (z->region >= regions.size() || z->first % 8 != 0 || z->first > regions[z->region].pages ||
            z->count > regions[z->region].pages - z->first)
            return peer_violation(fmt::format("{}: ZERO_BITMAP for region {} pages {}+{} does not fit", where, z->region,
                                              z->first, z->count));
        std::memcpy(zero_[z->region].data() + z->first / 8, z->bits.data(), z->bits.size());
        return true;
    }
    case proto::Type::sample_crcs: {
        auto s = proto::decode_sample_crcs(payload);
        if (!s) return std::unexpected(s.error().wrap(where));
        if (s->region >= regions.size()) return peer_violation(fmt::format("{}: SAMPLE_CRCS for region {}", where, s->region));
        for (const auto& x : s->samples) {
            if (x.page >= regions[s->region].pages)
                return peer_violation(fmt::format("{}: SAMPLE_CRCS for page {} of region {}", where, x.page, s->region));
            samples_[s->region][x.page] = x.crc;
        }
        return true;
    }
    case proto::Type::scan_done:
        if (bulk_thread_.joinable()) return peer_violation(fmt::format("{}: a second SCAN_DONE", where));
        try {
            bulk_thread_ = std::thread([this] { bulk_pull(); });
        } catch (const std::system_error& e) {
            return sys_error("destination: starting the RDMA bulk thread", e.code().value());
        }
        return true;
    default:
        return false;
    }
}

void RdmaPuller::bulk_pull() {
    if (auto r = bulk_sweep(); !r && r.error().code != ECANCELED && !pager_.complete()) fail(r.error());
}

Result<void> RdmaPuller::bulk_sweep() {
    struct Batch {
        std::uint32_t ri = 0;
        std::uint64_t first = 0;
        std::uint32_t count = 0;
        std::vector<bool> mine;
        bool busy = false;
    };
    std::array<Batch, kBulkInFlight> batches;
    const auto& regions = pager_.regions();

    // Verifies the sampled pages of a finished batch, then maps its claimed runs.
    auto finish = [&](std::uint32_t b) -> Result<void> {
        Batch& bt = batches[b];
        const auto& r = regions[bt.ri];
        const std::size_t ps = r.guest.page_size;
        const auto& t = targets_[bt.ri];
        const std::byte* slot = staging_ ? staging_ + kFaultSlots * slot_bytes_ + b * batch_bytes_ : nullptr;
        auto page_bytes = [&](std::uint32_t i) { return t.base ? t.base + (bt.first + i) * ps : slot + i * ps; };
        auto unclaim_all = [&] {
            for (std::uint32_t i = 0; i < bt.count; ++i)
                if (bt.mine[i]) pager_.unclaim(bt.ri, bt.first + i);
        };
        for (std::uint32_t i = 0; i < bt.count; ++i) {
            if (!bt.mine[i]) continue;
            auto s = samples_[bt.ri].find(bt.first + i);
            if (s == samples_[bt.ri].end()) continue;
            const std::uint32_t got = crc32c(0, page_bytes(i), ps);
            samples_checked_.fetch_add(1, std::memory_order_relaxed);
            if (got != s->second || failpoint::check("rdma_sample_mismatch", bt.ri, bt.first + i, 1)) {
                unclaim_all();
                return peer_violation(fmt::format("rdma: page {} of region {} '{}' read by RDMA has CRC32C {:#010x}, the "
                                                  "source's checksum is {:#010x}",
                                                  bt.first + i, bt.ri, r.guest.name, got, s->second));
            }
        }
        for (std::uint32_t i = 0; i < bt.count;) {
            if (!bt.mine[i]) {
                ++i;
                continue;
            }
            std::uint32_t j = i + 1;
            while (j < bt.count && bt.mine[j]) ++j;
            std::array<std::uint8_t, 128> z{};
            for (std::uint32_t k = i; k < j; ++k)
                if (zero_[bt.ri][(bt.first + k) / 8] >> ((bt.first + k) % 8) & 1) z[(k - i) / 8] |= std::uint8_t(1u << ((k - i) % 8));
            auto m = pager_.map_claimed(bt.ri, bt.first + i, j - i, ZeroBits{z}, t.base ? nullptr : page_bytes(i), false);
            if (!m) {
                for (std::uint32_t k = j; k < bt.count; ++k)
                    if (bt.mine[k]) pager_.unclaim(bt.ri, bt.first + k);
                return std::unexpected(m.error().wrap("rdma: placing a bulk batch"));
            }
            i = j;
        }
        bt.busy = false;
        return {};
    };

    // Claims what it can of [first, first+count) and posts the reads; false if nothing
    // needed a read (then the batch is finished at once).
    auto start = [&](std::uint32_t b, std::uint32_t ri, std::uint64_t first, std::uint32_t count) -> Result<bool> {
        Batch& bt = batches[b];
        bt = Batch{ri, first, count, std::vector<bool>(count), true};
        const auto& r = regions[ri];
        const std::size_t ps = r.guest.page_size;
        const auto& t = targets_[ri];
        std::vector<net::rdma::ReadWr> wrs;
        for (std::uint32_t i = 0; i < count;) {
            bt.mine[i] = pager_.claim(ri, first + i);
            const bool zero = zero_[ri][(first + i) / 8] >> ((first + i) % 8) & 1;
            if (!bt.mine[i] || zero) {
                ++i;
                continue;
            }
            std::uint32_t j = i + 1;
            bool lost = false;  // stopped at a page someone else holds (not at a zero page)
            for (; j < count; ++j) {
                if (zero_[ri][(first + j) / 8] >> ((first + j) % 8) & 1) break;
                if (!(bt.mine[j] = pager_.claim(ri, first + j))) {
                    lost = true;
                    break;
                }
            }
            net::rdma::ReadWr wr{};
            if (t.base) {
                wr.local = reinterpret_cast<std::uint64_t>(t.base + (first + i) * ps);
                wr.lkey = t.mr.lkey();
            } else {
                wr.local = reinterpret_cast<std::uint64_t>(staging_ + kFaultSlots * slot_bytes_ + b * batch_bytes_ + i * ps);
                wr.lkey = staging_mr_.lkey();
            }
            wr.len = static_cast<std::uint32_t>((j - i) * ps);
            wr.remote = t.remote.addr + (first + i) * ps;
            wr.rkey = t.remote.rkey;
            wrs.push_back(wr);
            i = lost ? j + 1 : j;
        }
        if (wrs.empty()) return false;
        bulk_reads_.fetch_add(wrs.size(), std::memory_order_relaxed);
        if (auto p = bulk_qp_->post_reads(wrs, b); !p) {
            for (std::uint32_t i = 0; i < count; ++i)
                if (bt.mine[i]) pager_.unclaim(ri, first + i);
            return std::unexpected(p.error());
        }
        return true;
    };

    std::uint32_t ri = 0;
    std::uint64_t cursor = 0;
    std::uint64_t last_hint = ~0ull;
    std::uint32_t busy = 0;
    std::array<net::rdma::Completion, kBulkInFlight> wc;
    for (;;) {
        // Fill free batch slots: the latest fault's neighbourhood first, then the sweep.
        for (std::uint32_t b = 0; b < kBulkInFlight && !pager_.complete(); ++b) {
            if (batches[b].busy) continue;
            std::uint32_t bri;
            std::uint64_t bfirst;
            const std::uint64_t h = hint_.load(std::memory_order_relaxed);
            if (h != last_hint && (h >> 48) < regions.size()) {
                last_hint = h;
                bri = static_cast<std::uint32_t>(h >> 48);
                const std::uint64_t per = batch_bytes_ / regions[bri].guest.page_size;
                bfirst = (h & ((1ull << 48) - 1)) / per * per;
            } else {
                while (ri < regions.size() && cursor >= regions[ri].pages) {
                    ++ri;
                    cursor = 0;
                }
                if (ri == regions.size()) break;
                bri = ri;
                bfirst = cursor;
            }
            const std::uint64_t per = batch_bytes_ / regions[bri].guest.page_size;
            const auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(per, regions[bri].pages - bfirst));
            if (bri == ri && bfirst == cursor) cursor += n;
            auto s = start(b, bri, bfirst, n);
            if (!s) return std::unexpected(s.error());
            if (*s) {
                ++busy;
            } else if (auto f = finish(b); !f) {
                return f;
            }
        }
        if (busy == 0) {
            if (ri == regions.size() || pager_.complete()) return {};
            continue;
        }
        auto n = bulk_qp_->poll(wc);
        if (!n) return std::unexpected(n.error());
        if (*n == 0) {
            if (auto w = bulk_qp_->wait(std::chrono::milliseconds(-1)); !w) return w;
            continue;
        }
        for (std::size_t i = 0; i < *n; ++i) {
            const auto b = static_cast<std::uint32_t>(wc[i].wr_id);
            if (wc[i].status != 0) {
                const auto& bt = batches[b];
                for (std::uint32_t k = 0; k < bt.count; ++k)
                    if (bt.mine[k]) pager_.unclaim(bt.ri, bt.first + k);
                return std::unexpected(Error{EIO,
                                             fmt::format("{}: RDMA READ of region {} '{}' pages {}+{} failed: {}",
                                                         bulk_qp_->where(), bt.ri, regions[bt.ri].guest.name, bt.first,
                                                         bt.count, wc[i].status_text),
                                             ErrorClass::transport_lost});
            }
            --busy;
            if (auto f = finish(b); !f) return f;
        }
    }
}

}  // namespace lazymig::pager
