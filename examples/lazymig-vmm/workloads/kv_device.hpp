// kv_device.hpp — the kv workload's network device: a TCP service on loopback.
//
// One I/O thread owns the listening socket and every connection; it blocks in poll on
// them, a wake-up eventfd (responses ready, clients to drop) and a stop eventfd. A
// request line is handed to the vCPUs through the gate (interrupt/wait_work); a vCPU
// executes it against guest RAM and hands the response back. Each connection has at
// most one request in flight, so responses keep request order and the request and
// response queues are bounded by kMaxConns. A response is an ack: it is sent only
// after the vCPU wrote guest RAM.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "../fd.hpp"
#include "../vcpu_gate.hpp"
#include "lazymig/error.hpp"

namespace vmm {

class KvDevice {
public:
    static constexpr std::size_t kMaxConns = 64;
    static constexpr std::size_t kMaxLine = 512;

    struct Request {
        std::uint32_t conn = 0;
        std::uint64_t gen = 0;  // the connection's generation: a reused slot drops stale replies
        std::string line;
    };

    // Binds 127.0.0.1:port (0: the kernel picks) and starts the I/O thread.
    [[nodiscard]] static lazymig::Result<std::unique_ptr<KvDevice>> start(std::uint16_t port, VcpuGate& gate);
    ~KvDevice();  // stops and joins the I/O thread
    KvDevice(const KvDevice&) = delete;
    KvDevice& operator=(const KvDevice&) = delete;

    [[nodiscard]] std::uint16_t port() const noexcept { return port_; }
    // vCPU side: halts in the gate until a request is queued (true) or the VM stops.
    [[nodiscard]] bool next(VcpuGate& gate, Request& out);
    // `epoch` > 0 (output commit, hybrid destination): the response is an ack of a write
    // the source does not hold yet; it leaves only once release(n >= epoch) was called.
    void respond(const Request& req, std::string line, std::uint64_t epoch = 0);
    // Every response of an epoch <= `epoch` may go out (on_epoch_committed).
    void release(std::uint64_t epoch);
    // Puts a request a vCPU could not finish back at the head of the queue.
    void requeue(Request req);
    // The VM moved away: close every connection and the listener.
    void drop_clients();
    // The VM runs here again (a hybrid source that resumed it from a checkpoint): listen
    // on the same port once more. Bound before it returns (a client that connects after
    // it is served); a no-op while serving. Does not block: lazymig's session thread calls it.
    [[nodiscard]] lazymig::Result<void> serve_again();
    [[nodiscard]] nlohmann::json status() const;

private:
    struct Conn {
        UniqueFd fd;
        std::string in, out;
        bool busy = false;
        std::uint64_t gen = 0;
    };
    struct Response {
        std::uint32_t conn;
        std::uint64_t gen;
        std::string line;
        std::uint64_t epoch = 0;  // output commit: held until release(>= epoch)
    };
    KvDevice(VcpuGate& gate) : gate_(gate) {}
    void run();
    void accept_one();
    void read_from(std::uint32_t c);
    void dispatch(std::uint32_t c);
    void flush(std::uint32_t c);
    void close_conn(std::uint32_t c, std::string_view why);
    void deliver_responses();
    void apply_listen_state();

    VcpuGate& gate_;
    UniqueFd listen_;
    std::uint16_t port_ = 0;
    EventFd wake_, stop_;
    std::vector<Conn> conns_{kMaxConns};  // I/O thread only
    std::deque<Request> queue_;           // under the gate's lock; <= kMaxConns entries
    mutable std::mutex resp_mu_;
    std::vector<Response> responses_;     // under resp_mu_; <= kMaxConns entries
    std::vector<Response> held_;          // I/O thread: not committed yet; <= kMaxConns
    std::atomic<std::uint64_t> committed_{0}, held_total_{0};
    // Serving (listener open), a drop asked (drop_clients) the I/O thread has not done
    // yet, or dropped; under listen_mu_. A listener bound by serve_again() waits in
    // relisten_ until the I/O thread takes it.
    enum class Listen { serving, drop_asked, dropped };
    mutable std::mutex listen_mu_;
    Listen listen_state_ = Listen::serving;
    UniqueFd relisten_;
    std::atomic<std::uint32_t> open_conns_{0};
    std::atomic<std::uint64_t> served_{0};
    std::thread thread_;  // the I/O thread; joined in the destructor
};

}  // namespace vmm
