// fc_vmm.hpp — Firecracker's side of the UFFD handler handshake, byte for byte as its
// src/vmm/src/persist.rs does it (guest_memory_from_uffd, send_uffd_handshake), for the
// tests and the benchmark of lazymig-uffd-handler (no KVM here, so no Firecracker):
//   - guest regions: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, read-write;
//   - userfaultfd(O_CLOEXEC | O_NONBLOCK) (not user-mode-only), UFFDIO_API with
//     UFFD_FEATURE_EVENT_REMOVE required, every region registered for MISSING faults;
//   - connect to the handler's socket; one sendmsg: serde_json's compact text of the
//     GuestRegionUffdMapping array as data, the uffd as SCM_RIGHTS; the socket is then
//     kept open (Firecracker forgets it) until the process exits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fd.hpp"
#include "lazymig/error.hpp"

namespace fc {

struct Region {
    std::byte* host = nullptr;
    std::size_t size = 0;
    std::uint64_t offset = 0;  // in the snapshot memory file: regions end to end
};

class Vmm {
public:
    [[nodiscard]] static lazymig::Result<Vmm> create(const std::vector<std::size_t>& sizes);
    Vmm() = default;
    Vmm(Vmm&&) noexcept = default;
    Vmm& operator=(Vmm&&) noexcept = default;
    ~Vmm();

    // serde_json::to_string of the mappings (page_size_kib holds bytes, as Firecracker sends it).
    [[nodiscard]] std::string mappings_json() const;
    // Connects to `path` and sends `text` with `fds` as SCM_RIGHTS (none: no control message).
    [[nodiscard]] lazymig::Result<void> send(const std::string& path, const std::string& text, const std::vector<int>& fds);
    // The real handshake: mappings_json() with the uffd.
    [[nodiscard]] lazymig::Result<void> handshake(const std::string& path) { return send(path, mappings_json(), {uffd_.get()}); }
    void hang_up() { sock_.reset(); }

    [[nodiscard]] const std::vector<Region>& regions() const { return regions_; }
    [[nodiscard]] int uffd() const { return uffd_.get(); }

private:
    std::vector<Region> regions_;
    vmm::UniqueFd uffd_, sock_;
};

// The snapshot pattern: page p of the file is all zero when p % 7 == 3 (zero pages take
// their own path), otherwise 8-byte words that encode their file offset.
[[nodiscard]] std::uint64_t word_at(std::uint64_t file_offset);
[[nodiscard]] bool zero_page(std::uint64_t file_offset);
// Writes a snapshot file of `bytes` with the pattern (1 MiB writes).
[[nodiscard]] lazymig::Result<void> write_snapshot(const std::string& path, std::uint64_t bytes);
// Checks one 4 KiB page of a region against the pattern: "" or what differs, where.
[[nodiscard]] std::string check_page(const Region& r, std::uint64_t page, bool expect_zero = false);

}  // namespace fc
