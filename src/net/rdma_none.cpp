// Built without rdma-core: an rdma: URI is refused with the reason, never served by TCP.
#include <fmt/format.h>

#include "src/net/rdma.hpp"

namespace lazymig::net {
namespace {
std::unexpected<Error> not_built(std::string_view uri) {
    return std::unexpected(Error{EPROTONOSUPPORT,
                                 fmt::format("uri '{}': this build of lazymig has no RDMA transport (rdma-core's "
                                             "libibverbs and librdmacm were not found when it was built; "
                                             "meson -Drdma=enabled requires them)",
                                             uri)});
}
}  // namespace

bool rdma_built() { return false; }
Result<std::unique_ptr<Transport>> rdma_connector(std::string_view uri, int, std::chrono::milliseconds,
                                                  std::shared_ptr<TlsContext>) {
    return not_built(uri);
}
Result<std::unique_ptr<Transport>> rdma_listener(std::string_view uri, int, std::shared_ptr<TlsContext>) {
    return not_built(uri);
}

// Never reached (no rdma: transport exists to call them); here so the data path links.
namespace rdma {
class Domain {};
MemoryRegion& MemoryRegion::operator=(MemoryRegion&& o) noexcept {
    domain_ = std::move(o.domain_);
    mr_ = std::exchange(o.mr_, nullptr);
    return *this;
}
MemoryRegion::~MemoryRegion() = default;
std::uint32_t MemoryRegion::lkey() const { return 0; }
std::uint32_t MemoryRegion::rkey() const { return 0; }
std::uintptr_t MemoryRegion::addr() const { return 0; }
bool supports_odp_read(const Domain&) { return false; }
std::string device_name(const Domain&) { return "none"; }
Result<MemoryRegion> register_memory(const std::shared_ptr<Domain>&, void*, std::size_t, bool, bool, std::string_view) {
    return not_built("rdma:");
}
Result<std::unique_ptr<QueuePair>> connect(const std::string&, std::uint16_t, std::span<const std::byte>,
                                           std::shared_ptr<Domain>, std::string, int, std::chrono::milliseconds) {
    return not_built("rdma:");
}
Result<std::unique_ptr<Listener>> listen(const std::string&, std::uint16_t, int) { return not_built("rdma:"); }
}  // namespace rdma

}  // namespace lazymig::net
