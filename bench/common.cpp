#include "bench/common.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <utility>

#include <fmt/format.h>

namespace bench {

Percentiles summarize(std::vector<std::uint32_t>& ns) {
    Percentiles p;
    p.count = ns.size();
    if (ns.empty()) return p;
    std::sort(ns.begin(), ns.end());
    auto at = [&](double q) {
        const auto rank = static_cast<std::size_t>(q * static_cast<double>(ns.size() - 1) + 0.5);
        return static_cast<double>(ns[rank]) / 1000.0;
    };
    p.p50_us = at(0.50);
    p.p99_us = at(0.99);
    p.p999_us = at(0.999);
    p.max_us = static_cast<double>(ns.back()) / 1000.0;
    p.mean_us = std::accumulate(ns.begin(), ns.end(), 0.0) / 1000.0 / static_cast<double>(ns.size());
    return p;
}

Rss read_rss() {
    // No allocation: this runs in samplers while a migration is measured.
    char buf[4096];
    Rss r;
    const int fd = ::open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return r;
    const ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return r;
    buf[n] = 0;
    auto field = [&](const char* name) -> std::uint64_t {
        const char* p = std::strstr(buf, name);
        return p ? std::strtoull(p + std::strlen(name), nullptr, 10) * 1024 : 0;
    };
    r.rss = field("VmRSS:");
    r.anon = field("RssAnon:");
    r.file = field("RssFile:");
    r.shmem = field("RssShmem:");
    return r;
}

CpuTimes cpu_times() {
    CpuTimes t;
    if (FILE* f = std::fopen("/proc/stat", "re")) {
        unsigned long long v[8] = {};
        if (std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                        &v[6], &v[7]) == 8) {
            const double hz = static_cast<double>(::sysconf(_SC_CLK_TCK));
            // user + nice + system. irq and softirq are left out: loopback TCP does most of its
            // work in softirq, which the kernel charges to no task, so it would look like
            // someone else's load.
            t.busy_s = double(v[0] + v[1] + v[2]) / hz;
            t.steal_s = double(v[7]) / hz;
        }
        std::fclose(f);
    }
    auto secs = [](const rusage& r) {
        return double(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + double(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
    };
    rusage self{}, children{};
    ::getrusage(RUSAGE_SELF, &self);
    ::getrusage(RUSAGE_CHILDREN, &children);
    t.own_s = secs(self) + secs(children);
    return t;
}

double process_cpu_s(pid_t pid) {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
    FILE* f = std::fopen(path, "re");
    if (!f) return 0;
    char buf[1024];
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    const char* p = std::strrchr(buf, ')');  // the command name may hold spaces
    if (!p) return 0;
    unsigned long long utime = 0, stime = 0;
    // Fields after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15)
    if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2) return 0;
    return double(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

void fill_content(std::byte* base, std::size_t bytes) {
    auto* w = reinterpret_cast<std::uint64_t*>(base);
    for (std::size_t i = 0; i < bytes / 8; ++i) w[i] = content_word(i);
}

std::byte* map_populated(std::size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("bench: mmap");
        std::_Exit(2);
    }
    ::madvise(p, bytes, MADV_NOHUGEPAGE);
    return static_cast<std::byte*>(p);
}

// --- Fields ---------------------------------------------------------------------------

Fields& Fields::set(const std::string& k, double v) {
    kv_[k] = fmt::format("{:.6g}", v);
    return *this;
}

Fields& Fields::set(const std::string& k, std::uint64_t v) {
    kv_[k] = std::to_string(v);
    return *this;
}

Fields& Fields::set_str(const std::string& k, std::string v) {
    if (k != "error") std::replace(v.begin(), v.end(), ' ', '_');
    std::replace(v.begin(), v.end(), '\n', ' ');
    kv_[k] = std::move(v);
    return *this;
}

Fields& Fields::merge(const Fields& other, const std::string& prefix) {
    for (const auto& [k, v] : other.kv_) kv_[prefix + k] = v;
    return *this;
}

double Fields::num(const std::string& k, double dflt) const {
    auto it = kv_.find(k);
    if (it == kv_.end()) return dflt;
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    return end == it->second.c_str() ? dflt : v;
}

std::string Fields::str(const std::string& k) const {
    auto it = kv_.find(k);
    return it == kv_.end() ? std::string() : it->second;
}

std::string Fields::line() const {
    std::string s;
    for (const auto& [k, v] : kv_) {
        if (k == "error") continue;
        if (!s.empty()) s += ' ';
        s += k + '=' + v;
    }
    if (auto it = kv_.find("error"); it != kv_.end()) s += (s.empty() ? "" : " ") + std::string("error=") + it->second;
    return s;
}

Fields Fields::parse(std::string_view line) {
    Fields f;
    while (!line.empty()) {
        const auto sp = line.find(' ');
        std::string_view tok = line.substr(0, sp);
        const auto eq = tok.find('=');
        if (eq != std::string_view::npos) {
            std::string key(tok.substr(0, eq));
            if (key == "error") {  // the rest of the line
                f.kv_[key] = std::string(line.substr(eq + 1));
                break;
            }
            f.kv_[key] = std::string(tok.substr(eq + 1));
        } else if (!tok.empty()) {
            f.kv_[std::string(tok)] = "1";
        }
        if (sp == std::string_view::npos) break;
        line.remove_prefix(sp + 1);
    }
    return f;
}

void emit(int fd, const Fields& f) {
    const std::string s = f.line() + '\n';
    std::size_t off = 0;
    while (off < s.size()) {
        const ssize_t n = ::write(fd, s.data() + off, s.size() - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;  // the reader is gone; it will report that
        off += static_cast<std::size_t>(n);
    }
}

// --- child processes ----------------------------------------------------------------

namespace {

std::optional<Fields> read_line(int fd, std::string& buf) {
    for (;;) {
        if (const auto nl = buf.find('\n'); nl != std::string::npos) {
            Fields f = Fields::parse(std::string_view(buf).substr(0, nl));
            buf.erase(0, nl + 1);
            return f;
        }
        char tmp[4096];
        const ssize_t n = ::read(fd, tmp, sizeof tmp);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return std::nullopt;
        buf.append(tmp, static_cast<std::size_t>(n));
    }
}

}  // namespace

std::optional<Fields> LineReader::next() { return read_line(fd_, buf_); }

Child Child::spawn(const std::function<int(int, int)>& body) {
    int down[2], up[2];
    if (::pipe2(down, O_CLOEXEC) != 0 || ::pipe2(up, O_CLOEXEC) != 0) {
        std::perror("bench: pipe2");
        std::exit(2);
    }
    std::fflush(nullptr);  // the child must not flush the parent's buffered output again
    const pid_t pid = ::fork();
    if (pid < 0) {
        std::perror("bench: fork");
        std::exit(2);
    }
    if (pid == 0) {
        ::close(down[1]);
        ::close(up[0]);
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the orchestrator
        ::alarm(600);  // a wedged migration must not hang the benchmark forever
        const int rc = body(down[0], up[1]);
        std::fflush(nullptr);
        std::_Exit(rc);
    }
    ::close(down[0]);
    ::close(up[1]);
    Child c;
    c.pid_ = pid;
    c.to_ = down[1];
    c.from_ = up[0];
    return c;
}

Child::Child(Child&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)), to_(std::exchange(o.to_, -1)), from_(std::exchange(o.from_, -1)),
      buf_(std::move(o.buf_)) {}

Child& Child::operator=(Child&& o) noexcept {
    if (this != &o) {
        finish();
        pid_ = std::exchange(o.pid_, -1);
        to_ = std::exchange(o.to_, -1);
        from_ = std::exchange(o.from_, -1);
        buf_ = std::move(o.buf_);
    }
    return *this;
}

Child::~Child() { finish(); }

std::optional<Fields> Child::recv() {
    if (from_ < 0) return std::nullopt;
    return read_line(from_, buf_);
}

std::string Child::finish() {
    if (to_ >= 0) ::close(std::exchange(to_, -1));
    if (from_ >= 0) ::close(std::exchange(from_, -1));
    if (pid_ < 0) return "not running";
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    if (WIFEXITED(status)) return fmt::format("exit {}", WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return fmt::format("killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
    return "ended";
}

Fields run_in_child(const std::function<Fields()>& fn) {
    Child c = Child::spawn([&](int, int out) {
        emit(out, fn());
        return 0;
    });
    auto f = c.recv();
    const std::string how = c.finish();
    if (!f) return Fields().set_str("error", "probe process ended without a report (" + how + ")");
    return *f;
}

}  // namespace bench
