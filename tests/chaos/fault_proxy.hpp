// fault_proxy.hpp — a TCP proxy that sits between a migration's source and destination
// and breaks the link on command: the fault half of tests/chaos.
//
//   auto p = FaultProxy::create({.listen_port = 0, .target_port = dst_port, .control = dir + "/proxy.sock"});
//   std::thread t([&] { p->run(); });          // the proxy's one thread
//   ... the source migrates to tcp:127.0.0.1:<p->port()>; commands go to the control socket ...
//   p->stop(); t.join();
//
// Every accepted connection is forwarded to the target (each migration channel is its
// own TCP connection: urgent first, then bulk, later replication), numbered 1, 2, ...
// in accept order. Per direction a buffer of kBufferBytes: a side that does not read
// stops the other side's reads (TCP's own back-pressure), nothing grows.
//
// Control: a Unix stream socket; one command per line, each answered by zero or more
// detail lines and one last line "ok ..." or "error ...":
//   cut              drop every connection (RST both ways) and refuse new ones (accept,
//                    then RST) until heal
//   heal             forward again (new connections only: dropped ones stay dropped)
//   stall MS         hold the bytes in both directions of every connection for MS ms
//                    (nothing is written; reads stop when a buffer is full): a link that
//                    goes silent, as a partition looks to TCP; `stall 0` ends a stall
//   throttle BPS [up]  at most BPS bytes per second over all connections and directions
//                    (a token bucket, burst BPS/10), or with `up` over the source → target
//                    direction only (post-copy pages slow, back-replication free);
//                    `throttle 0` lifts it
//   corrupt [K]      flip (xor 0xff) one byte of the next bytes forwarded from the
//                    source side to the target (on connection K only, if given)
//   close K          close connection K only (RST both ways); the others go on
//   list             "conn K up BYTES down BYTES open|closed [corrupted@OFFSET]" per
//                    connection, then "ok N"
//   target PORT      later connections go to 127.0.0.1:PORT (a destination that listens
//                    again on a new address)
//   listen           one more listening port, forwarding like the first: "ok PORT"
//   quit             run() returns
// "up" is source → target, "down" target → source.
//
// Threads: run() is the one thread that owns every socket; it blocks only in
// epoll_wait, with a timeout (≤ 1 s, shorter when a stall ends or tokens refill).
// stop() may be called from any thread; run() returns soon after. create() and the
// accessors are for the owner thread before run().
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace chaos {

struct ProxyConfig {
    std::uint16_t listen_port = 0;   // 0: any free port on 127.0.0.1
    std::uint16_t target_port = 0;   // the destination's port on 127.0.0.1
    std::string control;             // the Unix socket path for commands
};

class FaultProxy {
public:
    static constexpr std::size_t kBufferBytes = 256 * 1024;
    static constexpr std::size_t kMaxConnections = 64;     // accepted beyond: refused (RST)
    static constexpr std::size_t kMaxControlClients = 8;
    static constexpr std::size_t kMaxControlLine = 4096;

    // Binds the listening port and the control socket. Throws std::runtime_error naming
    // the call and errno.
    [[nodiscard]] static std::unique_ptr<FaultProxy> create(const ProxyConfig& config);
    ~FaultProxy();
    FaultProxy(const FaultProxy&) = delete;
    FaultProxy& operator=(const FaultProxy&) = delete;

    [[nodiscard]] std::uint16_t port() const noexcept;
    // Forwards until stop() or `quit`. Returns "" or why it had to end (an epoll error).
    [[nodiscard]] std::string run();
    void stop() noexcept;

    class Impl;

private:
    explicit FaultProxy(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

}  // namespace chaos
