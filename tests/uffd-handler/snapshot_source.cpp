// snapshot_source FILE URI SIZE:OFFSET... — a lazymig Source in its own process whose
// pages come from a snapshot memory file (SourceConfig::read_pages): the remote page
// source of lazymig-uffd-handler --listen. Regions are named ram0, ram1, ... as the
// handler names the VMM's mappings; the key is the file named by LAZYMIG_PSK_FILE. Exits 0
// once the destination has every page.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "lazymig/lazymig.hpp"

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: snapshot_source FILE URI SIZE:OFFSET...\n");
        return 2;
    }
    const int fd = ::open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) return std::perror(argv[1]), 1;
    std::vector<lazymig::GuestRegion> regions;
    std::vector<std::uint64_t> offsets;
    for (int i = 3; i < argc; ++i) {
        unsigned long long size = 0, offset = 0;
        if (std::sscanf(argv[i], "%llu:%llu", &size, &offset) != 2) return 2;
        // The pages are read from the file; the region only needs an address of its own.
        void* host = ::mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (host == MAP_FAILED) return std::perror("mmap"), 1;
        regions.push_back({.name = "ram" + std::to_string(i - 3), .host = host, .size = size});
        offsets.push_back(offset);
    }
    lazymig::VmmHooks hooks{.pause_vcpus = [] {}, .resume_vcpus = [] {},
                            .save_device_state = [] { return lazymig::Result<std::vector<std::byte>>{}; }};
    auto src = lazymig::Source::create(
        {.regions = regions, .hooks = hooks,
         .read_pages = [&](std::uint32_t r, std::uint64_t off, std::span<std::byte> dst) -> lazymig::Result<void> {
             const ssize_t n = ::pread(fd, dst.data(), dst.size(), static_cast<off_t>(offsets[r] + off));
             if (n != static_cast<ssize_t>(dst.size())) return lazymig::sys_error("pread snapshot", n < 0 ? errno : EIO);
             return {};
         },
         .uri = argv[2], .mode = lazymig::Mode::postcopy,
         .security = {.auth = lazymig::Auth::psk, .psk_file = std::getenv("LAZYMIG_PSK_FILE") ? std::getenv("LAZYMIG_PSK_FILE") : ""}});
    if (!src) return std::fprintf(stderr, "snapshot_source: %s\n", src.error().message().c_str()), 1;
    if (auto m = (*src)->migrate(); !m) return std::fprintf(stderr, "snapshot_source: %s\n", m.error().message().c_str()), 1;
    if (auto w = (*src)->wait(); !w) return std::fprintf(stderr, "snapshot_source: %s\n", w.error().message().c_str()), 1;
    std::printf("snapshot_source: done\n");
    return 0;
}
