#include "options.hpp"

#include <charconv>

#include <fmt/format.h>

namespace vmm {

lazymig::Result<std::uint64_t> parse_size(std::string_view s) {
    std::uint64_t n = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
    if (ec != std::errc{} || end == s.data()) return lazymig::logic_error(fmt::format("'{}' is not a size (e.g. 256M, 1G)", s));
    std::string_view unit(end, static_cast<std::size_t>(s.data() + s.size() - end));
    if (unit.ends_with("iB")) unit.remove_suffix(2);
    else if (unit.size() > 1 && unit.ends_with("B")) unit.remove_suffix(1);
    unsigned shift = 0;
    if (unit.empty()) shift = 0;
    else if (unit == "K" || unit == "k") shift = 10;
    else if (unit == "M" || unit == "m") shift = 20;
    else if (unit == "G" || unit == "g") shift = 30;
    else if (unit == "T" || unit == "t") shift = 40;
    else return lazymig::logic_error(fmt::format("'{}': unknown size unit '{}' (K, M, G, T)", s, unit));
    if (shift && n > (UINT64_MAX >> shift)) return lazymig::logic_error(fmt::format("'{}' is too large", s));
    return n << shift;
}

lazymig::Result<std::uint32_t> parse_percent(std::string_view s) {
    if (s.ends_with('%')) s.remove_suffix(1);
    std::uint32_t n = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
    if (ec != std::errc{} || end != s.data() + s.size() || n == 0 || n > 100)
        return lazymig::logic_error(fmt::format("'{}' is not a percentage in 1..100", s));
    return n;
}

lazymig::Result<WorkloadKind> parse_workload(std::string_view s) {
    for (auto k : {WorkloadKind::pattern, WorkloadKind::bank, WorkloadKind::kv, WorkloadKind::idle, WorkloadKind::dirty})
        if (s == to_string(k)) return k;
    return lazymig::logic_error(fmt::format("unknown workload '{}' (pattern, bank, kv, idle, dirty)", s));
}

lazymig::Result<DirtyPattern> parse_pattern(std::string_view s) {
    for (auto p : {DirtyPattern::seq, DirtyPattern::random, DirtyPattern::zipf})
        if (s == to_string(p)) return p;
    return lazymig::logic_error(fmt::format("unknown pattern '{}' (seq, random, zipf)", s));
}

}  // namespace vmm
