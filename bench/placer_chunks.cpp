// lazymig-bench-placer: the Placer's claim chunk against its throughput, on a fresh memfd
// (pwritev + UFFDIO_CONTINUE) and on anonymous memory (UFFDIO_COPY), frames of 1024
// pages from one populated staging buffer, as the receiver places them. Also prints the
// time per chunk: a vCPU whose page is in chunk k of a frame waits for chunks 0..k.
// usage: lazymig-bench-placer [MiB]
#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "pager/pager.hpp"

using namespace lazymig;

int main(int argc, char** argv) {
    const std::size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 256;
    const std::size_t size = mib << 20, pages = size / 4096;
    constexpr std::uint32_t kFrame = 1024;
    std::vector<std::byte> staging(kFrame * 4096);
    for (std::size_t i = 0; i < staging.size(); ++i) staging[i] = std::byte(i * 7 + 1);
    const std::vector<std::uint8_t> nonzero(kFrame / 8, 0);
    for (Backing b : {Backing::memfd, Backing::anon}) {
        for (std::uint32_t chunk : {64u, 128u, 256u, 512u, 1024u}) {
            GuestRegion g{.name = "ram0", .host = nullptr, .size = size, .page_size = 4096, .backing = b, .fd = -1, .fd_offset = 0};
            if (b == Backing::memfd) {
                g.fd = ::memfd_create("bench", MFD_CLOEXEC);
                if (g.fd < 0 || ::ftruncate(g.fd, static_cast<off_t>(size)) != 0) return std::perror("memfd"), 1;
                g.host = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, g.fd, 0);
            } else {
                g.host = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            }
            if (g.host == MAP_FAILED) return std::perror("mmap"), 1;
            {
                auto p = pager::Pager::create(std::span(&g, 1), 16);
                if (!p) return std::fprintf(stderr, "%s\n", p.error().message().c_str()), 1;
                (*p)->set_place_chunk(chunk);
                const auto t0 = std::chrono::steady_clock::now();
                for (std::size_t f = 0; f < pages; f += kFrame) {
                    auto r = (*p)->place(0, f, kFrame, pager::ZeroBits{nonzero}, staging.data(), false);
                    if (!r) return std::fprintf(stderr, "%s\n", r.error().message().c_str()), 1;
                }
                const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                const auto& c = (*p)->placer_counters();
                std::printf("%-6s chunk %4u pages: %5.2f GB/s  %6.1f us per chunk  (%llu writes, %llu map ioctls)\n",
                            std::string(to_string(b)).c_str(), chunk, size / s / 1e9, s * 1e6 / (pages / chunk),
                            static_cast<unsigned long long>(c.write_calls.get()),
                            static_cast<unsigned long long>(c.map_calls.get()));
                std::fflush(stdout);
            }
            ::munmap(g.host, size);
            if (g.fd >= 0) ::close(g.fd);
        }
    }
    return 0;
}
