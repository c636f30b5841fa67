#include "src/failpoint.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace lazymig::failpoint {
namespace detail {
std::atomic<int> g_armed{0};
}

namespace {
std::mutex g_mu;
std::map<std::string, Action, std::less<>> g_points;

// The named pipe a `hold:FIFO` waits on. It is opened read-write so it never reports
// POLLHUP for want of a writer; the byte the test writes is never read, so every held
// hit, and every later one, sees POLLIN.
class Release {
public:
    explicit Release(int fd) : fd_(fd) {}
    ~Release() { ::close(fd_); }
    Release(const Release&) = delete;
    Release& operator=(const Release&) = delete;

    // 0 once released; ETIMEDOUT at the deadline.
    int wait(std::chrono::steady_clock::time_point deadline) const {
        for (;;) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) return ETIMEDOUT;
            pollfd p{fd_, POLLIN, 0};
            const int n = ::poll(&p, 1, static_cast<int>(left.count()));
            if (n > 0 && (p.revents & POLLIN)) return 0;
            if (n < 0 && errno != EINTR) return errno;
        }
    }

private:
    int fd_;
};

int hold(const std::shared_ptr<Release>& release, std::string_view name) {
    const auto deadline = std::chrono::steady_clock::now() + kHoldLimit;
    int e = ETIMEDOUT;
    if (release) e = release->wait(deadline);
    else std::this_thread::sleep_until(deadline);  // nothing releases it: the test kills this process
    if (e != 0) std::fprintf(stderr, "lazymig failpoint %.*s: hold ended without a release (errno %d)\n",
                             static_cast<int>(name.size()), name.data(), e);
    return e;
}

// SIGKILL of this process on the `at`-th hit (counted over every thread), at once: no
// destructor, no flush, no goodbye frame — a host that died. The line on stderr is
// written first (unbuffered) so the log says where it died.
Action kill_at(std::string_view name, std::uint64_t at) {
    auto hits = std::make_shared<std::atomic<std::uint64_t>>(0);
    return [hits, at, n = std::string(name)](const Site& s) {
        if (hits->fetch_add(1, std::memory_order_relaxed) + 1 != at) return 0;
        std::fprintf(stderr, "lazymig failpoint %s: kill at hit %llu (region %u, first %llu, count %u)\n", n.c_str(),
                     static_cast<unsigned long long>(at), s.region, static_cast<unsigned long long>(s.first), s.count);
        ::kill(::getpid(), SIGKILL);
        for (;;) ::pause();  // SIGKILL cannot be caught; this thread never goes on
    };
}

// One action of the spec, or "" in *why.
Action parse_action(std::string_view name, std::string_view a, std::string* why) {
    if (a.starts_with("error:")) {
        const std::string num(a.substr(6));
        char* end = nullptr;
        const long e = std::strtol(num.c_str(), &end, 10);
        if (num.empty() || *end != '\0' || e <= 0 || e > 4095) {
            *why = "error:E needs an errno number, got '" + num + "'";
            return {};
        }
        return [e = static_cast<int>(e)](const Site&) { return e; };
    }
    if (a == "hold") return [n = std::string(name)](const Site&) { return hold(nullptr, n); };
    if (a.starts_with("hold:")) {
        const std::string path(a.substr(5));
        const int fd = ::open(path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            *why = "hold:" + path + ": cannot open the pipe (errno " + std::to_string(errno) + ")";
            return {};
        }
        auto release = std::make_shared<Release>(fd);
        return [release, n = std::string(name)](const Site&) { return hold(release, n); };
    }
    if (a == "kill") return kill_at(name, 1);
    if (a.starts_with("kill:")) {
        const std::string num(a.substr(5));
        char* end = nullptr;
        const unsigned long long at = std::strtoull(num.c_str(), &end, 10);
        if (num.empty() || num[0] == '-' || *end != '\0' || at == 0) {
            *why = "kill:N needs a hit number from 1, got '" + num + "'";
            return {};
        }
        return kill_at(name, at);
    }
    *why = "unknown action '" + std::string(a) + "' (error:E, hold, hold:FIFO, kill, kill:N)";
    return {};
}

const bool g_from_env = [] {
    const char* spec = std::getenv("LAZYMIG_FAILPOINTS");
    if (spec == nullptr || *spec == '\0') return false;
    if (const std::string why = arm_spec(spec); !why.empty()) {
        std::fprintf(stderr, "lazymig: LAZYMIG_FAILPOINTS ignored: %s\n", why.c_str());
        return false;
    }
    return true;
}();

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

std::string arm_spec(std::string_view spec) {
    std::vector<std::pair<std::string, Action>> parsed;
    while (!spec.empty()) {
        const auto semi = spec.find(';');
        const std::string_view item = spec.substr(0, semi);
        spec = semi == std::string_view::npos ? std::string_view{} : spec.substr(semi + 1);
        if (item.empty()) continue;
        const auto eq = item.find('=');
        if (eq == std::string_view::npos || eq == 0) return "'" + std::string(item) + "' is not name=action";
        std::string why;
        Action a = parse_action(item.substr(0, eq), item.substr(eq + 1), &why);
        if (!a) return std::string(item.substr(0, eq)) + ": " + why;
        parsed.emplace_back(std::string(item.substr(0, eq)), std::move(a));
    }
    for (auto& [name, action] : parsed) arm(name, std::move(action));
    return {};
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
