// Post-copy over RDMA, on a real RDMA stack: run by tests/rdma/guest.sh inside a
// soft-RoCE guest (or directly on a host with an RDMA device, LAZYMIG_RDMA_ADDR set).
// Two lazymig-peer processes migrate over rdma:ADDR:0; the destination's 4 workers
// read and write while pages arrive, and every byte is checked afterwards.
//
// Kernel features: the destination needs userfaultfd MISSING (anon) and MINOR_SHMEM
// (memfd); the Debian 6.1 guest has both but neither POISON nor MOVE, so a source lost
// mid-transfer cannot poison the missing pages there: that test runs without workers
// (nothing may touch a page that will never come) and asserts the error and the end.
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "tests/postcopy/process.hpp"

using lazymig::test::Process;

namespace {

const std::string kPeer = LAZYMIG_PEER;

std::string rdma_uri() {
    const char* a = std::getenv("LAZYMIG_RDMA_ADDR");
    REQUIRE_MESSAGE(a, "LAZYMIG_RDMA_ADDR is not set: run this through tests/rdma/guest.sh");
    return std::string("rdma:") + a + ":0";
}

struct Run {
    int src_rc = 0, dst_rc = 0;
    std::string src, dst;
};

Run migrate(const std::string& backing, const std::string& mib, const std::string& dest_uri, unsigned workers = 4,
            std::vector<std::string> src_env = {}, bool kill_source_at_resume = false) {
    Process dest({kPeer, "dest", "--size", mib, "--backing", backing, "--seed", "11", "--workers",
                  std::to_string(workers), "--uri", dest_uri, "--psk-file", lazymig::test::psk_file()});
    REQUIRE(dest.started());
    auto uri = dest.until("uri ");
    REQUIRE_MESSAGE(uri, dest.output());
    std::string to = uri->substr(4);
    if (to.starts_with("tcp:") && dest_uri.starts_with("tcp:")) to = "rdma:" + to.substr(4);  // an RDMA source
    Process source({kPeer, "source", "--size", mib, "--backing", backing, "--seed", "11", "--uri", to, "--psk-file",
                    lazymig::test::psk_file()},
                   src_env);
    REQUIRE(source.started());
    if (kill_source_at_resume) {
        REQUIRE_MESSAGE(dest.until("resumed"), dest.output());
        source.kill(SIGKILL);
    }
    Run r;
    r.src_rc = source.wait();
    r.dst_rc = dest.wait();
    r.src = source.output();
    r.dst = dest.output();
    MESSAGE("source:\n" << r.src << "destination:\n" << r.dst);
    return r;
}

void check_complete(const Run& r) {
    CHECK(r.src_rc == 0);
    CHECK(r.dst_rc == 0);
    CHECK(r.src.find("source done") != std::string::npos);
    CHECK(r.dst.find("phase=completed") != std::string::npos);
    CHECK(r.dst.find("wrong_units=0") != std::string::npos);
    CHECK(r.dst.find("bad_reads=0") != std::string::npos);
    CHECK(r.dst.find("missing=0 resumed=1") != std::string::npos);
    // Pages came by RDMA READ: no PAGES frame carried any (pushed counts bulk reads).
    CHECK(r.dst.find(" pushed=0 ") == std::string::npos);
}

}  // namespace

TEST_CASE("rdma/postcopy/anon") { check_complete(migrate("anon", "128", rdma_uri())); }
TEST_CASE("rdma/postcopy/memfd") { check_complete(migrate("memfd", "128", rdma_uri())); }

TEST_CASE("rdma/wrong-rkey") {
    // The source advertises a corrupted rkey: the destination's first READ completes with
    // a remote access error, the migration fails with it, and nothing hangs.
    auto r = migrate("memfd", "32", rdma_uri(), 0, {"LAZYMIG_FAILPOINTS=rdma_source_wrong_rkey=error:1"});
    CHECK(r.dst_rc == 3);
    CHECK(r.dst.find("RDMA READ of region 0 'ram0' pages") != std::string::npos);
    CHECK(r.dst.find("remote access error") != std::string::npos);
    CHECK(r.dst.find("phase=failed") != std::string::npos);
    CHECK(r.src_rc == 3);
}

TEST_CASE("rdma/source-disappears") {
    // The source's zero-page scan is held, so the bulk pull cannot start; the source is
    // killed once the destination resumed: the destination fails naming the lost link.
    auto r = migrate("anon", "64", rdma_uri(), 0, {"LAZYMIG_FAILPOINTS=rdma_source_scan=hold"}, true);
    CHECK(r.dst_rc == 3);
    CHECK(r.dst.find("phase=failed") != std::string::npos);
    CHECK(r.dst.find("the VM cannot continue") != std::string::npos);
    CHECK(r.dst.find("pages never arrived") != std::string::npos);
}

TEST_CASE("rdma/peer-without-rdma") {
    // A destination listening on tcp: refuses an RDMA source's offer: no silent TCP.
    auto host = std::string(std::getenv("LAZYMIG_RDMA_ADDR") ? std::getenv("LAZYMIG_RDMA_ADDR") : "127.0.0.1");
    auto r = migrate("anon", "16", "tcp:" + host + ":0", 0);
    CHECK(r.dst_rc == 3);
    CHECK(r.dst.find("unexpected RDMA_OFFER before the device state") != std::string::npos);
    CHECK(r.src_rc == 3);
    CHECK(r.src.find("unexpected RDMA_OFFER before the device state") != std::string::npos);
}
