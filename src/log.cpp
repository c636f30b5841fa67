#include "src/log.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>

namespace lazymig::log {
namespace {

Level initial_level() noexcept {
    const char* env = std::getenv("LAZYMIG_LOG");
    if (!env) return Level::warn;
    if (!std::strcmp(env, "error")) return Level::error;
    if (!std::strcmp(env, "info")) return Level::info;
    if (!std::strcmp(env, "debug")) return Level::debug;
    return Level::warn;
}

std::atomic<int> g_level{static_cast<int>(initial_level())};
const auto g_start = std::chrono::steady_clock::now();
constexpr std::string_view kNames[] = {"error", "warn", "info", "debug"};

}  // namespace

bool enabled(Level l) noexcept { return static_cast<int>(l) <= g_level.load(std::memory_order_relaxed); }
void set_level(Level l) noexcept { g_level.store(static_cast<int>(l), std::memory_order_relaxed); }

void emit(Level l, std::string_view event, std::string_view text) noexcept {
    try {
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
        auto line = fmt::format("lazymig {} {:.6f} {} {} {}\n", ::getpid(), t, kNames[static_cast<int>(l)],
                                event, text);
        // One write per line so lines from several threads do not interleave.
        [[maybe_unused]] auto n = ::write(STDERR_FILENO, line.data(), line.size());
    } catch (...) {
        // Formatting failed (out of memory): a lost log line must not take the VMM down.
    }
}

}  // namespace lazymig::log
