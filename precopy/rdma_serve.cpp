// The source's RDMA side: registration, then one scan for zeroes and samples.
#include "precopy/rdma_serve.hpp"

#include <sys/mman.h>

#include <cstring>

#include <fmt/format.h>

#include "src/crc32c.hpp"
#include "src/failpoint.hpp"
#include "src/log.hpp"

namespace lazymig::source {
namespace {
constexpr std::chrono::milliseconds kSetupTimeout{30'000};
constexpr std::size_t kSamplesPerFrame = 65536;
constexpr std::uint32_t kScanPages = 1024;  // 4 MiB reads through the kernel, as the pusher's
}  // namespace

Result<std::unique_ptr<RdmaServer>> RdmaServer::setup(std::span<const GuestRegion> regions, net::FrameReader& urgent,
                                                       const std::string& host, std::uint64_t session, int stop_fd) {
    std::unique_ptr<RdmaServer> s(new RdmaServer(regions));
    if (auto r = net::send_frame(urgent.channel(), proto::encode_empty(proto::Type::rdma_offer)); !r)
        return std::unexpected(r.error());
    auto raw = urgent.expect(proto::Type::rdma_listen);
    if (!raw) return std::unexpected(raw.error());
    auto at = proto::decode_rdma_listen(*raw);
    if (!at) return std::unexpected(at.error().wrap(urgent.where()));
    using net::rdma::Role;
    const auto fp = net::rdma::private_data(Role::fault, session);
    auto fq = net::rdma::connect(host, at->port, fp, nullptr,
                                 fmt::format("rdma fault queue pair to {}:{}", host, at->port), stop_fd, kSetupTimeout);
    if (!fq) return std::unexpected(fq.error().wrap("source"));
    s->fault_qp_ = std::move(*fq);
    const auto bp = net::rdma::private_data(Role::bulk, session);
    auto bq = net::rdma::connect(host, at->port, bp, s->fault_qp_->domain(),
                                 fmt::format("rdma bulk queue pair to {}:{}", host, at->port), stop_fd, kSetupTimeout);
    if (!bq) return std::unexpected(bq.error().wrap("source"));
    s->bulk_qp_ = std::move(*bq);
    const auto& d = s->fault_qp_->domain();
    s->device_ = net::rdma::device_name(*d);
    s->on_demand_ = net::rdma::supports_odp_read(*d);
    proto::RdmaRegions table{.on_demand = s->on_demand_};
    for (const auto& r : regions) {
        auto mr = net::rdma::register_memory(d, r.host, r.size, true, s->on_demand_, fmt::format("region '{}'", r.name));
        if (!mr) return std::unexpected(mr.error().wrap("source"));
        std::uint32_t rkey = mr->rkey();
        if (failpoint::check("rdma_source_wrong_rkey", 0, 0, 0)) rkey ^= 0x5a5a5a;
        table.regions.push_back({reinterpret_cast<std::uint64_t>(r.host), r.size, rkey});
        s->mrs_.push_back(std::move(*mr));
    }
    LZ_LOG(info, "rdma_source_registered", "device={} on_demand={} regions={}", s->device_, s->on_demand_,
           regions.size());
    if (auto r = net::send_frame(urgent.channel(), proto::encode(table)); !r) return std::unexpected(r.error());
    if (auto r = urgent.expect(proto::Type::rdma_ready); !r) return std::unexpected(r.error());
    return s;
}

RdmaServer::~RdmaServer() { stop(); }

void RdmaServer::stop() {
    if (thread_.joinable()) thread_.join();
}

RdmaServeReport RdmaServer::report() const { return {device_, on_demand_, zero_pages_.load(), samples_.load()}; }

Result<void> RdmaServer::start_scan(net::Channel& bulk, PageReader& reader, std::function<void(const Error&)> on_error) {
    try {
        thread_ = std::thread([this, &bulk, &reader, on_error = std::move(on_error)] {
            if (auto r = scan(bulk, reader); !r) on_error(r.error().wrap("source: zero-page scan"));
        });
    } catch (const std::system_error& e) {
        return sys_error("source: starting the zero-page scan thread", e.code().value());
    }
    return {};
}

// Reads each region through the kernel (the PageReader) in 4 MiB runs: one ZERO_BITMAP
// frame per run, one SAMPLE_CRCS frame per region.
Result<void> RdmaServer::scan(net::Channel& bulk, PageReader& reader) {
    if (int e = failpoint::check("rdma_source_scan", 0, 0, 0)) return sys_error("source: failpoint rdma_source_scan", e);
    std::size_t max_ps = 4096;
    for (const auto& r : regions_) max_ps = std::max<std::size_t>(max_ps, r.page_size);
    const std::size_t len = kScanPages * max_ps;
    void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (m == MAP_FAILED) return sys_error(fmt::format("mmap {} bytes of scan buffer", len));
    auto* buf = static_cast<std::byte*>(m);
    struct Unmap {
        void* p;
        std::size_t n;
        ~Unmap() { ::munmap(p, n); }
    } unmap{m, len};
    for (std::uint32_t ri = 0; ri < regions_.size(); ++ri) {
        const auto& r = regions_[ri];
        const std::uint64_t pages = r.size / r.page_size;
        proto::SampleCrcs samples{ri, {}};
        for (std::uint64_t first = 0; first < pages; first += kScanPages) {
            const auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(kScanPages, pages - first));
            if (auto rd = reader.read(ri, first, n, buf); !rd) return rd;
            proto::ZeroBitmap z{ri, first, n, std::vector<std::uint8_t>((n + 7) / 8)};
            for (std::uint32_t i = 0; i < n; ++i) {
                const std::byte* p = buf + std::size_t(i) * r.page_size;
                const bool zero = p[0] == std::byte{0} && std::memcmp(p, p + 1, r.page_size - 1) == 0;
                if (zero) {
                    z.bits[i / 8] |= std::uint8_t(1u << (i % 8));
                    zero_pages_.fetch_add(1, std::memory_order_relaxed);
                } else if ((first + i) % kSampleStride == 0) {
                    samples.samples.push_back({first + i, crc32c(0, p, r.page_size)});
                }
                if (samples.samples.size() == kSamplesPerFrame) {  // within kMaxControlPayload
                    samples_.fetch_add(samples.samples.size(), std::memory_order_relaxed);
                    if (auto s = net::send_frame(bulk, proto::encode(samples)); !s) return s;
                    samples.samples.clear();
                }
            }
            if (auto s = net::send_frame(bulk, proto::encode(z)); !s) return s;
        }
        samples_.fetch_add(samples.samples.size(), std::memory_order_relaxed);
        if (auto s = net::send_frame(bulk, proto::encode(samples)); !s) return s;
    }
    return net::send_frame(bulk, proto::encode_empty(proto::Type::scan_done));
}

}  // namespace lazymig::source
