// precopy/rdma_serve.hpp — the source's side of the RDMA data path: it registers guest
// RAM for remote READ and then stays out of the way. The destination reads every page
// itself (pager/rdma_pull.hpp); the source's CPU only scans once for the zero bitmap and
// the sample checksums, after the destination resumed.
//
//   auto s = RdmaServer::setup(regions, ureader, host, session, stop_fd);  // after REGION_ACK
//   ... pause, DEVICE_STATE, RESUMED ...
//   s->start_scan(bulk0, reader, on_error);   // ZERO_BITMAP, SAMPLE_CRCS, SCAN_DONE
//   s->stop();                                // joins the scan thread
//
// Registration: IBV_ACCESS_ON_DEMAND when the device serves RC READs from on-demand
// paging (nothing pinned; report() says which), otherwise the regions are pinned.
// Consistency: from the pause on, nothing writes guest RAM here (the vCPUs stay paused
// until the migration ends), so every READ sees the image the device state belongs to.
#pragma once

#include <memory>
#include <thread>
#include <vector>

#include "precopy/page_reader.hpp"
#include "src/net/frames.hpp"
#include "src/net/rdma.hpp"

namespace lazymig::source {

struct RdmaServeReport {
    std::string device;
    bool on_demand = false;
    std::uint64_t zero_pages = 0, samples = 0;
};

class RdmaServer {
public:
    // Reads RDMA_LISTEN, connects the fault and bulk QPs to host:port, registers every
    // region, sends RDMA_REGIONS and waits for RDMA_READY.
    [[nodiscard]] static Result<std::unique_ptr<RdmaServer>> setup(std::span<const GuestRegion> regions,
                                                                   net::FrameReader& urgent, const std::string& host,
                                                                   std::uint64_t session, int stop_fd);
    ~RdmaServer();
    // Starts the thread that reads every page once and sends the zero bitmap and the
    // sample CRCs on `bulk`, then SCAN_DONE. `on_error` is called on failure.
    [[nodiscard]] Result<void> start_scan(net::Channel& bulk, PageReader& reader,
                                          std::function<void(const Error&)> on_error);
    void stop();
    [[nodiscard]] RdmaServeReport report() const;

    // One page in kSampleStride (of the non-zero ones) has its CRC32C sent.
    static constexpr std::uint64_t kSampleStride = 64;

private:
    RdmaServer(std::span<const GuestRegion> regions) : regions_(regions.begin(), regions.end()) {}
    Result<void> scan(net::Channel& bulk, PageReader& reader);

    std::vector<GuestRegion> regions_;
    std::unique_ptr<net::rdma::QueuePair> fault_qp_, bulk_qp_;
    std::vector<net::rdma::MemoryRegion> mrs_;
    std::string device_;
    bool on_demand_ = false;
    std::atomic<std::uint64_t> zero_pages_{0}, samples_{0};
    std::thread thread_;
};

}  // namespace lazymig::source
