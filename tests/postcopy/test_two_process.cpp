// Two processes on loopback: a source and a destination whose workers read and write
// random pages while pages are still arriving; afterwards every byte is checked.
#include <doctest/doctest.h>

#include <string>

#include "tests/postcopy/process.hpp"

using lazymig::test::Process;

namespace {

const std::string kPeer = LAZYMIG_PEER;

void migrate_and_check(const std::string& backing, const std::string& size_mib, unsigned bulk_channels) {
    Process dest({kPeer, "dest", "--size", size_mib, "--backing", backing, "--seed", "7", "--workers", "4", "--psk-file", lazymig::test::psk_file()});
    REQUIRE(dest.started());
    auto uri = dest.until("uri ");
    REQUIRE_MESSAGE(uri, dest.output());
    Process source({kPeer, "source", "--size", size_mib, "--backing", backing, "--seed", "7", "--uri", uri->substr(4), "--psk-file", lazymig::test::psk_file(),
                    "--bulk-channels", std::to_string(bulk_channels)});
    REQUIRE(source.started());
    const int src_rc = source.wait();
    const int dst_rc = dest.wait();
    INFO("source output:\n" << source.output());
    INFO("destination output:\n" << dest.output());
    CHECK(src_rc == 0);
    CHECK(dst_rc == 0);
    CHECK(source.output().find("source done") != std::string::npos);
    CHECK(dest.output().find("wrong_units=0") != std::string::npos);
    CHECK(dest.output().find("bad_reads=0") != std::string::npos);
    CHECK(dest.output().find("phase=completed") != std::string::npos);
    CHECK(dest.output().find("missing=0 resumed=1") != std::string::npos);
    CHECK(source.output().find("resumed=1") != std::string::npos);
    // Both sides ran the channels asked for: the destination learnt the count from HELLO.
    CHECK(source.output().find(" bulk=" + std::to_string(bulk_channels) + " ") != std::string::npos);
    CHECK(dest.output().find(" bulk=" + std::to_string(bulk_channels) + " ") != std::string::npos);
    // An invariant, not a speed check: no fault can have waited longer than the whole
    // test has run (a wrapped timestamp once reported 4.4e9 µs).
    const auto at = dest.output().find("fault_max_ms=");
    REQUIRE(at != std::string::npos);
    CHECK(std::stoull(dest.output().substr(at + 13)) < 600'000);
}

}  // namespace

TEST_CASE("postcopy/two-process/anon-1g") { migrate_and_check("anon", "1024", 1); }
TEST_CASE("postcopy/two-process/memfd-1g") { migrate_and_check("memfd", "1024", 1); }
TEST_CASE("postcopy/two-process/anon-3-bulk-channels") { migrate_and_check("anon", "512", 3); }
TEST_CASE("postcopy/two-process/memfd-3-bulk-channels") { migrate_and_check("memfd", "512", 3); }

TEST_CASE("postcopy/two-process/source-dies") {
    // The source's pusher is held at its first batch (fail point, armed through the
    // environment) until it is killed right after the destination resumed: every page
    // but the few the workers demanded is still missing, on any machine speed.
    for (const std::string backing : {"anon", "memfd"}) {
        CAPTURE(backing);
        // The link loss pauses the destination first; nobody recovers it within 1 s.
        Process dest({kPeer, "dest", "--size", "256", "--backing", backing, "--seed", "3", "--workers", "4",
                      "--recover-timeout-ms", "1000", "--psk-file", lazymig::test::psk_file()});
        REQUIRE(dest.started());
        auto uri = dest.until("uri ");
        REQUIRE_MESSAGE(uri, dest.output());
        Process source({kPeer, "source", "--size", "256", "--backing", backing, "--seed", "3", "--uri", uri->substr(4), "--psk-file", lazymig::test::psk_file()},
                       {"LAZYMIG_FAILPOINTS=source_push_batch=hold"});
        REQUIRE(source.started());
        REQUIRE_MESSAGE(dest.until("resumed"), dest.output());
        source.kill(SIGKILL);
        CHECK(source.wait() == -SIGKILL);
        const int rc = dest.wait();
        INFO("destination output:\n" << dest.output());
        CHECK(rc == 3);  // failed, and no read ever saw zeroes where data belonged
        const auto& out = dest.output();
        CHECK(out.find("the VM cannot continue") != std::string::npos);
        CHECK(out.find("pages never arrived (poisoned: a touch raises SIGBUS)") != std::string::npos);
        CHECK(out.find("ZERO-FILL") == std::string::npos);
        CHECK(out.find("phase=failed") != std::string::npos);
        // The count in the error and in Stats::pages_missing agree, and is most of the VM.
        const auto at = out.find(" of 65536 pages never arrived");
        REQUIRE(at != std::string::npos);
        const auto from = out.rfind(' ', at - 1) + 1;
        const std::string missing = out.substr(from, at - from);
        CHECK(std::stoull(missing) > 65536 / 2);
        const auto pushed = out.find(" pushed=0 ");  // the destination's stats line
        CHECK_MESSAGE(pushed != std::string::npos, "the held pusher sent pages");
        CHECK(out.find("missing=" + missing + " resumed=1") != std::string::npos);
    }
}
