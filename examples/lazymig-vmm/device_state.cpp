#include "device_state.hpp"

#include <cstring>

#include <fmt/format.h>

namespace vmm {

namespace {
constexpr char kMagic[8] = {'L', 'Z', 'M', 'V', 'D', 'S', '0', '1'};
constexpr std::uint32_t kVersion = 1;
constexpr std::uint32_t kWords = std::size(VcpuRegs{}.r);

struct Header {
    char magic[8];
    std::uint32_t version, workload, vcpus, words;
    std::uint64_t memory, seed;
};

std::uint64_t fnv1a(std::span<const std::byte> b) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (std::byte c : b) h = (h ^ static_cast<std::uint8_t>(c)) * 0x100000001b3ull;
    return h;
}

template <class T>
void put(std::vector<std::byte>& out, const T& v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    out.insert(out.end(), p, p + sizeof v);
}
}  // namespace

std::vector<std::byte> encode_device_state(const DeviceState& s) {
    std::vector<std::byte> out;
    Header h{};
    std::memcpy(h.magic, kMagic, sizeof kMagic);
    h.version = kVersion;
    h.workload = static_cast<std::uint32_t>(s.kind);
    h.vcpus = static_cast<std::uint32_t>(s.regs.size());
    h.words = kWords;
    h.memory = s.memory;
    h.seed = s.seed;
    put(out, h);
    for (const auto& r : s.regs) put(out, r.r);
    put(out, fnv1a(out));
    return out;
}

lazymig::Result<DeviceState> decode_device_state(std::span<const std::byte> blob) {
    Header h;
    if (blob.size() < sizeof h + sizeof(std::uint64_t))
        return lazymig::logic_error(fmt::format("device state: {} bytes is shorter than its header", blob.size()));
    std::memcpy(&h, blob.data(), sizeof h);
    if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0)
        return lazymig::logic_error("device state: bad magic (not from lazymig-vmm)");
    if (h.version != kVersion || h.words != kWords)
        return lazymig::logic_error(fmt::format("device state: version {} with {} words per vCPU, expected {} and {}",
                                                h.version, h.words, kVersion, kWords));
    const std::size_t want = sizeof h + std::size_t{h.vcpus} * sizeof(VcpuRegs) + sizeof(std::uint64_t);
    if (h.vcpus == 0 || h.vcpus > 1024 || blob.size() != want)
        return lazymig::logic_error(fmt::format("device state: {} bytes for {} vCPUs, expected {}", blob.size(), h.vcpus, want));
    std::uint64_t sum;
    std::memcpy(&sum, blob.data() + want - sizeof sum, sizeof sum);
    if (sum != fnv1a(blob.first(want - sizeof sum)))
        return lazymig::logic_error("device state: checksum mismatch (corrupt in transit?)");
    DeviceState s{static_cast<WorkloadKind>(h.workload), h.vcpus, h.memory, h.seed, std::vector<VcpuRegs>(h.vcpus)};
    for (std::uint32_t v = 0; v < h.vcpus; ++v)
        std::memcpy(s.regs[v].r, blob.data() + sizeof h + v * sizeof(VcpuRegs), sizeof(VcpuRegs));
    return s;
}

}  // namespace vmm
