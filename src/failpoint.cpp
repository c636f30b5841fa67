#include "src/failpoint.hpp"

#include <map>
#include <mutex>
#include <string>

namespace lazymig::failpoint {
namespace detail {
std::atomic<int> g_armed{0};
}

namespace {
std::mutex g_mu;
std::map<std::string, Action, std::less<>> g_points;
}  // namespace

void arm(std::string_view name, Action action) {
    std::lock_guard lock(g_mu);
    g_points[std::string(name)] = std::move(action);
    detail::g_armed.store(static_cast<int>(g_points.size()), std::memory_order_relaxed);
}

void disarm_all() {
    std::lock_guard lock(g_mu);
    g_points.clear();
    detail::g_armed.store(0, std::memory_order_relaxed);
}

int detail::hit(std::string_view name, const Site& site) {
    Action action;
    {
        std::lock_guard lock(g_mu);
        auto it = g_points.find(name);
        if (it == g_points.end()) return 0;
        action = it->second;  // called unlocked: it may block
    }
    return action(site);
}

}  // namespace lazymig::failpoint
