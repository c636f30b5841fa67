#include "sigbus_guard.hpp"

#include <setjmp.h>
#include <signal.h>

namespace vmm {

namespace {
thread_local sigjmp_buf* t_jump = nullptr;  // set while this thread runs guarded work
thread_local void* t_addr = nullptr;

void on_sigbus(int, siginfo_t* si, void*) {
    if (t_jump) {
        t_addr = si->si_addr;
        siglongjmp(*t_jump, 1);  // restores the signal mask saved by sigsetjmp(.., 1)
    }
    // Not guest work: back to the default action; the access repeats and kills us.
    struct sigaction dfl{};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGBUS, &dfl, nullptr);
}
}  // namespace

void install_sigbus_handler() {
    struct sigaction sa{};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, nullptr);
}

std::optional<std::uintptr_t> run_guarded(const std::function<void()>& work) {
    sigjmp_buf jump;
    sigjmp_buf* const outer = t_jump;
    if (sigsetjmp(jump, 1) != 0) {
        t_jump = outer;
        return reinterpret_cast<std::uintptr_t>(t_addr);
    }
    t_jump = &jump;
    work();
    t_jump = outer;
    return std::nullopt;
}

}  // namespace vmm
