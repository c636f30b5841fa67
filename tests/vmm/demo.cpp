// vmm/demo: scripts/demo as CI runs it (small memory, no package set-up, the build we
// are testing), checked for the summary it must print.
#include <doctest/doctest.h>

#include <string>

#include "harness.hpp"

using namespace vmm::test;

TEST_CASE("vmm/demo/summary") {
    TempDir dir;
    auto demo = Process::spawn({"/bin/bash", source_root() + "/scripts/demo", "--memory", "128M"}, dir.file("demo.log"),
                               {"LAZYMIG_SKIP_SETUP=1", "LAZYMIG_VMM=" + vmm_binary(), "LAZYMIG_DEMO_DIR=" + dir.path()});
    const std::string out = demo->read_all(240s);
    INFO("demo stdout: " << out);
    INFO("demo stderr: " << tail(dir.file("demo.log")));
    CHECK(demo->wait(20s) == 0);
    for (const char* want : {"migration summary", "result                completed", "pages total           32768",
                             "downtime", "fault latency p99", "check-workload        ok", "demo: done"})
        CHECK_MESSAGE(out.find(want) != std::string::npos, want);
    // An invariant, not a speed check: no fault waited longer than the demo ran. A fault
    // stamped during its page's placement once wrapped to 4398046511 us here.
    const auto at = out.find("fault latency p99");
    REQUIRE(at != std::string::npos);
    const double p99_us = std::stod(out.substr(out.find_first_of("0123456789", at)));
    CHECK(p99_us < 240e6);
}
