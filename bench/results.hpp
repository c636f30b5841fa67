// bench/results.hpp — printing one migration's figures beside their floors and targets.
#pragma once

#include <string>

#include "bench/common.hpp"
#include "bench/report.hpp"

namespace bench {

// What a run's figures are judged against and where they go in the JSON object.
struct RunLabels {
    std::string title;     // "1g memfd"
    std::string size_tag;  // "1g"
    std::string tag;       // "1g", or "1g_anon" when memfd is the headline backing
    std::string sfx;       // tag, plus "_throttled" for the throttled variant
    std::string variant;   // "push", "fault", "fault_throttled"
    bool push = false, throttled = false;
    bool headline = false;  // its figures also go to the headline keys (fault_p50_us, push_gbps)
    int touchers = 0;
    double throttle_mbps = 0;
    double floor_fault_us = 0;   // raw peer-served uffd fault, p50 (floors.hpp remote_fault)
    double floor_push_gbps = 0;  // the kernel-copy pipeline (floors.hpp pipeline)
};

// Prints the run's lines and target checks and adds its JSON keys.
void report_run(Report& rep, const Fields& f, const RunLabels& r);

}  // namespace bench
