#include "bench/report.hpp"

#include <cmath>

#include <fmt/format.h>

namespace bench {

void Json::num(const std::string& key, double v) {
    if (!std::isfinite(v)) {
        kv_.emplace_back(key, "null");
        return;
    }
    if (v == std::floor(v) && std::fabs(v) < 1e15)
        kv_.emplace_back(key, fmt::format("{}", static_cast<long long>(v)));
    else
        kv_.emplace_back(key, fmt::format("{:.6g}", v));
}

void Json::boolean(const std::string& key, bool v) { kv_.emplace_back(key, v ? "true" : "false"); }

void Json::str(const std::string& key, const std::string& v) {
    std::string e = "\"";
    for (char c : v) {
        if (c == '"' || c == '\\') e += '\\';
        if (static_cast<unsigned char>(c) < 0x20) {
            e += fmt::format("\\u{:04x}", c);
            continue;
        }
        e += c;
    }
    kv_.emplace_back(key, e + "\"");
}

std::string Json::dump() const {
    std::string s = "{";
    for (std::size_t i = 0; i < kv_.size(); ++i) {
        if (i) s += ", ";
        s += "\"" + kv_[i].first + "\": " + kv_[i].second;
    }
    return s + "}";
}

void Report::check(const std::string& what, const std::string& figure, const std::string& target, bool met) {
    checks_.push_back({what, figure, target, met});
    line(fmt::format("      {:<40} {:<40} target {:<22} {}", what, figure, target, met ? "met" : "MISSED"));
}

void Report::summary() const {
    std::printf("\ntargets (DESIGN.md, judged against this run's floors)\n");
    for (const auto& c : checks_)
        std::printf("  %-7s %-40s %-40s target %s\n", c.met ? "met" : "MISSED", c.what.c_str(), c.figure.c_str(),
                    c.target.c_str());
    std::size_t missed = 0;
    for (const auto& c : checks_) missed += !c.met;
    std::printf("  %zu of %zu targets met%s\n", checks_.size() - missed, checks_.size(),
                missed ? " — MISSED targets above are not failures of the run, but say where time goes" : "");
    std::fflush(stdout);
}

bool Report::all_met() const {
    for (const auto& c : checks_)
        if (!c.met) return false;
    return true;
}

std::string mib(double bytes) { return fmt::format("{:.2f} MiB", bytes / (1 << 20)); }

}  // namespace bench
