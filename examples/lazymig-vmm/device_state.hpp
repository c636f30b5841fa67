// device_state.hpp — the device-state blob: the vCPU registers and what the destination
// must agree on before it loads them.
//
//   "LZMVDS01" | u32 version (1) | u32 workload | u32 vcpus | u32 words per vCPU (8)
//   | u64 guest memory bytes | u64 boot seed | vcpus x 8 x u64 registers | u64 FNV-1a of all before
// Little-endian host order: source and destination run on the same architecture.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "guest_layout.hpp"
#include "lazymig/error.hpp"

namespace vmm {

struct DeviceState {
    WorkloadKind kind = WorkloadKind::invalid;
    std::uint32_t vcpus = 0;
    std::uint64_t memory = 0;
    std::uint64_t seed = 0;
    std::vector<VcpuRegs> regs;
};

[[nodiscard]] std::vector<std::byte> encode_device_state(const DeviceState& s);
// Refuses a blob that is short, long, from another version or fails its checksum,
// saying which.
[[nodiscard]] lazymig::Result<DeviceState> decode_device_state(std::span<const std::byte> blob);

}  // namespace vmm
