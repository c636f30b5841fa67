// `lazymig-vmm run`: the VM process.
//
// Threads: main (this function: set-up, then blocks in poll on a signalfd and the quit
// eventfd, then tears down), the QMP server thread, the vCPU threads, the workload's
// device threads, and lazymig's own (owned through Migration). Teardown in reverse
// order of creation: QMP server, Migration (cancels, joins), Vm (vCPUs, devices, RAM).
//
// stdout carries only lines for other programs, each flushed:
//   qmp: PATH | incoming: tcp:HOST:PORT | kv: tcp:127.0.0.1:PORT | ready
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "events.hpp"
#include "fd.hpp"
#include "log.hpp"
#include "migration.hpp"
#include "options.hpp"
#include "qmp_commands.hpp"
#include "qmp_server.hpp"
#include "sigbus_guard.hpp"
#include "vm.hpp"

namespace vmm {

namespace {
int fail(const lazymig::Error& e) {
    fmt::print(stderr, "lazymig-vmm: error: {}\n", e.message());
    return 1;
}

void announce(const std::string& line) {
    fmt::print("{}\n", line);
    std::fflush(stdout);
}
}  // namespace

int run_vm(const RunOptions& o) {
    // Signals become events for main's poll: blocked here, before any thread exists,
    // so every thread inherits the mask and none is interrupted by them.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    if (::pthread_sigmask(SIG_BLOCK, &set, nullptr) != 0) return fail({errno, "pthread_sigmask"});
    ::signal(SIGPIPE, SIG_IGN);  // sockets use MSG_NOSIGNAL; belt and braces
    install_sigbus_handler();    // poisoned guest pages stop a vCPU, not the process
    UniqueFd sigfd(::signalfd(-1, &set, SFD_CLOEXEC));
    if (!sigfd) return fail({errno, "signalfd"});
    auto quit = EventFd::create();
    if (!quit) return fail(quit.error());

    auto events = EventBus::create();
    if (!events) return fail(events.error());
    auto vm = Vm::create(o.vm);
    if (!vm) return fail(vm.error());
    std::optional<std::string> incoming;
    int rc = 0;
    {
        (*vm)->set_events(events->get());
        Migration migration(**vm, events->get(), o.security, o.poison_on_loss,
                            std::chrono::milliseconds(o.recover_timeout_ms), o.epoch_ms, o.lease_ms);
        if (o.incoming) {
            auto uri = migration.listen(*o.incoming);
            if (!uri) return fail(uri.error());
            incoming = *uri;
        }
        if (auto ok = (*vm)->start(); !ok) return fail(ok.error());
        QmpCommands commands(**vm, migration, [&] { quit->signal(); });
        auto server = QmpServer::start(o.qmp, **events, QmpCommands::greeting(), [&](std::string_view line, QmpServer::Session& session) {
            return commands.handle(line, session);
        });
        if (!server) return fail(server.error());

        announce("qmp: " + o.qmp);
        if (incoming) announce("incoming: " + *incoming);
        if (auto port = (*vm)->service_port()) announce(fmt::format("kv: tcp:127.0.0.1:{}", *port));
        announce("ready");

        pollfd fds[2] = {{sigfd.get(), POLLIN, 0}, {quit->fd(), POLLIN, 0}};
        for (;;) {
            if (::poll(fds, 2, -1) >= 0) break;
            if (errno != EINTR) {
                rc = fail({errno, "poll for quit"});
                break;
            }
        }
        if (fds[0].revents) {
            signalfd_siginfo si{};
            [[maybe_unused]] auto n = ::read(sigfd.get(), &si, sizeof si);
            log_event("vm_quit", "reason=signal signal={}", si.ssi_signo);
        } else {
            log_event("vm_quit", "reason=qmp");
        }
        (*server)->stop();
    }  // Migration: cancels what still runs and joins
    (*vm)->stop();
    return rc;
}

}  // namespace vmm
