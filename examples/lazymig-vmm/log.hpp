// log.hpp — one structured line per state transition, on stderr:
//   lazymig-vmm[1234] vm_state status=running
// stdout is reserved for the lines other programs read (qmp:, incoming:, kv:, ready).
#pragma once

#include <unistd.h>

#include <cstdio>
#include <string_view>

#include <fmt/format.h>

namespace vmm {

template <class... Args>
void log_event(std::string_view event, fmt::format_string<Args...> f, Args&&... args) {
    // One fwrite per line keeps lines from different threads whole.
    const auto line = fmt::format("lazymig-vmm[{}] {} {}\n", ::getpid(), event,
                                  fmt::format(f, std::forward<Args>(args)...));
    std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace vmm
