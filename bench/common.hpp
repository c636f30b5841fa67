// bench/common.hpp — what the benchmark's pieces share: the clock, percentiles, /proc
// memory counters, the guest content, and the line protocol between the orchestrator
// and the processes it forks.
//
// Process model: the orchestrator (main.cpp) never starts a thread, so it may fork at any
// time. Every probe and every migration endpoint runs in a child it forks; a child
// reports on a pipe in lines of `key=value` fields and ends with _exit.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace bench {

inline constexpr std::size_t kPage = 4096;

[[nodiscard]] inline std::uint64_t now_ns() {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
}

// Nearest-rank percentiles of latencies in nanoseconds; sorts `ns`.
struct Percentiles {
    std::uint64_t count = 0;
    double p50_us = 0, p99_us = 0, p999_us = 0, max_us = 0, mean_us = 0;
};
[[nodiscard]] Percentiles summarize(std::vector<std::uint32_t>& ns);

// Resident memory of this process from /proc/self/status, in bytes. VmRSS is the sum of
// the other three; a shared page mapped twice (memfd alias + guest view) counts twice.
struct Rss {
    std::uint64_t rss = 0, anon = 0, file = 0, shmem = 0;
};
[[nodiscard]] Rss read_rss();

// CPU time the whole machine spent busy (and stolen by the hypervisor) since boot, and
// what this process and its reaped children used: the difference over a run is load
// that other processes put on the machine while we measured.
struct CpuTimes {
    double busy_s = 0, steal_s = 0, own_s = 0;
};
[[nodiscard]] CpuTimes cpu_times();
// CPU seconds a live process has used so far (/proc/PID/stat utime + stime).
[[nodiscard]] double process_cpu_s(pid_t pid);

// Guest content: word i (8 bytes) of guest RAM is content_word(i). Never zero, so the
// source sends no zero page, and no two pages are alike.
[[nodiscard]] inline std::uint64_t content_word(std::uint64_t i) {
    std::uint64_t z = i + 0x9E3779B97F4A7C15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) | 1;
}
void fill_content(std::byte* base, std::size_t bytes);

// Populated anonymous memory (MAP_POPULATE, no huge pages) that the caller unmaps.
[[nodiscard]] std::byte* map_populated(std::size_t bytes);

// One line of `key=value` fields. Values hold no spaces; `error` is special: it is the
// rest of the line, so it may.
class Fields {
public:
    Fields& set(const std::string& k, double v);
    Fields& set(const std::string& k, std::uint64_t v);
    Fields& set_str(const std::string& k, std::string v);
    Fields& merge(const Fields& other, const std::string& prefix = {});
    [[nodiscard]] bool has(const std::string& k) const { return kv_.count(k) != 0; }
    [[nodiscard]] double num(const std::string& k, double dflt = 0) const;
    [[nodiscard]] std::string str(const std::string& k) const;
    [[nodiscard]] std::string line() const;
    [[nodiscard]] static Fields parse(std::string_view line);
    [[nodiscard]] const std::map<std::string, std::string>& all() const { return kv_; }

private:
    std::map<std::string, std::string> kv_;
};

// Writes one line of fields to `fd` in one write (pipes keep it whole).
void emit(int fd, const Fields& f);

// A forked child with a command pipe (parent → child) and a report pipe (child → parent).
class Child {
public:
    // Forks; the child runs `body(command_fd, report_fd)` and _exits with its value.
    // REQUIRES: the calling process has no thread but the main one.
    [[nodiscard]] static Child spawn(const std::function<int(int, int)>& body);
    Child() = default;
    Child(Child&&) noexcept;
    Child& operator=(Child&&) noexcept;
    Child(const Child&) = delete;
    ~Child();

    void send(const Fields& f) const { emit(to_, f); }
    // The next report; nullopt when the child closed its end (exited or crashed).
    [[nodiscard]] std::optional<Fields> recv();
    // Closes the pipes and reaps the child; returns a description of how it ended.
    std::string finish();
    [[nodiscard]] pid_t pid() const { return pid_; }

private:
    pid_t pid_ = -1;
    int to_ = -1, from_ = -1;
    std::string buf_;
};

// Reads lines from a fd (the child's command pipe).
class LineReader {
public:
    explicit LineReader(int fd) : fd_(fd) {}
    [[nodiscard]] std::optional<Fields> next();

private:
    int fd_;
    std::string buf_;
};

// Runs `fn` in a forked child and returns its one report (an `error` field on failure).
[[nodiscard]] Fields run_in_child(const std::function<Fields()>& fn);

}  // namespace bench
