// The two-process migration over hugetlbfs memory. Reserves the huge pages it needs and
// gives them back; exits 77 (skip) when the kernel cannot provide them.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>

#include "tests/postcopy/process.hpp"

using lazymig::test::Process;

namespace {
long read_long(const char* path) {
    std::ifstream f(path);
    long v = -1;
    f >> v;
    return v;
}
bool write_long(const char* path, long v) {
    std::ofstream f(path);
    f << v;
    return static_cast<bool>(f.flush());
}
const char* kNr = "/proc/sys/vm/nr_hugepages";
const char* kFree = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const char* kResv = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages";
// Free pages that another process has reserved (a hugetlb mapping not yet faulted in)
// count as free but cannot be had.
long available() { return read_long(kFree) - std::max(0L, read_long(kResv)); }
}  // namespace

int main() {
    const long size_mib = 512, need = 2 * size_mib / 2;  // both sides, 2 MiB pages
    const long before = read_long(kNr);
    if (before < 0) return std::puts("skip: no hugetlbfs support"), 77;
    if (available() < need && !write_long(kNr, before + need)) {
        std::printf("skip: cannot reserve %ld huge pages (need root)\n", need);
        return 77;
    }
    if (available() < need) {
        std::printf("skip: only %ld free, unreserved huge pages, need %ld\n", available(), need);
        write_long(kNr, before);
        return 77;
    }
    int rc = 0;
    for (const char* channels : {"1", "3"}) {
        std::printf("--- %s bulk channel(s)\n", channels);
        const std::string peer = LAZYMIG_PEER, size = std::to_string(size_mib);
        Process dest({peer, "dest", "--size", size, "--backing", "hugetlbfs", "--seed", "11", "--workers", "4", "--psk-file", lazymig::test::psk_file()});
        auto uri = dest.until("uri ");
        if (!uri && dest.output().find("not enough free 2 MiB huge pages") != std::string::npos) {
            // Taken by another process between our check and the allocation: the
            // machine's, not lazymig's; say so and skip rather than fail.
            std::printf("skip: the huge pages were taken meanwhile (%ld available now):\n%s\n", available(),
                        dest.output().c_str());
            write_long(kNr, before);
            return rc != 0 ? rc : 77;  // an earlier failure stays a failure
        }
        if (!uri) {
            std::printf("FAIL: destination did not listen:\n%s\n", dest.output().c_str());
            rc = 1;
        } else {
            Process source({peer, "source", "--size", size, "--backing", "hugetlbfs", "--seed", "11", "--uri", uri->substr(4), "--psk-file", lazymig::test::psk_file(),
                            "--bulk-channels", channels});
            const int s = source.wait(), d = dest.wait();
            std::printf("source (%d):\n%s\ndestination (%d):\n%s\n", s, source.output().c_str(), d, dest.output().c_str());
            const std::string bulk = std::string(" bulk=") + channels + " ";
            if (s != 0 || d != 0 || dest.output().find("wrong_units=0") == std::string::npos ||
                dest.output().find(bulk) == std::string::npos || source.output().find(bulk) == std::string::npos)
                rc = 1;
        }
    }
    write_long(kNr, before);
    std::puts(rc == 0 ? "PASS: hugetlbfs two-process migration verified" : "FAIL");
    return rc;
}
