// lazymig-fault-proxy: the fault proxy of tests/chaos as a program.
//
//   lazymig-fault-proxy --to PORT --control PATH [--listen PORT]
//
// Prints "proxy: tcp:127.0.0.1:PORT" and "ready" on stdout, then forwards until a
// `quit` command, SIGINT or SIGTERM. The commands are listed in fault_proxy.hpp.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include "fault_proxy.hpp"

int main(int argc, char** argv) {
    chaos::ProxyConfig c;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string k = argv[i], v = argv[i + 1];
        if (k == "--to") c.target_port = static_cast<std::uint16_t>(std::atoi(v.c_str()));
        else if (k == "--listen") c.listen_port = static_cast<std::uint16_t>(std::atoi(v.c_str()));
        else if (k == "--control") c.control = v;
        else return std::fprintf(stderr, "lazymig-fault-proxy: unknown option %s\n", k.c_str()), 2;
    }
    if (argc % 2 == 0 || c.target_port == 0 || c.control.empty())
        return std::fprintf(stderr, "usage: lazymig-fault-proxy --to PORT --control PATH [--listen PORT]\n"), 2;
    // The signals go to one waiting thread (blocked everywhere else), which stops run().
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    try {
        auto proxy = chaos::FaultProxy::create(c);
        std::printf("proxy: tcp:127.0.0.1:%u\nready\n", unsigned(proxy->port()));
        std::fflush(stdout);
        std::thread signals([&] {
            int sig = 0;
            sigwait(&set, &sig);
            proxy->stop();
        });
        const std::string why = proxy->run();
        ::kill(::getpid(), SIGUSR1);  // run() ended by itself (quit): release the signal thread
        signals.join();
        if (!why.empty()) return std::fprintf(stderr, "%s\n", why.c_str()), 1;
    } catch (const std::exception& e) {
        return std::fprintf(stderr, "%s\n", e.what()), 1;
    }
    return 0;
}
