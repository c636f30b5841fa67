#include "handshake.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace uffd_handler {
namespace {

using Clock = std::chrono::steady_clock;
using lazymig::Error;
using lazymig::ErrorClass;

std::unexpected<Error> refuse(std::string what) {
    return std::unexpected(Error{0, std::move(what), ErrorClass::peer_violation});
}

// Every fd of every SCM_RIGHTS message in `msg`, appended to `out` (owned from here).
void take_fds(msghdr& msg, std::vector<vmm::UniqueFd>& out) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < n; ++i) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            out.emplace_back(fd);
        }
    }
}

std::string hex_range(const Mapping& m) { return fmt::format("[{:#x}, {:#x})", m.base, m.base + m.size); }

}  // namespace

lazymig::Result<Handshake> receive_handshake(int conn, std::chrono::milliseconds timeout) {
    Handshake h;
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return lazymig::sys_error("handshake: SO_PEERCRED");
    h.pid = cred.pid;
    const std::string who = fmt::format("handshake from pid {}", h.pid);
    const auto deadline = Clock::now() + timeout;
    std::string text;
    std::vector<vmm::UniqueFd> fds;
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0)
            return std::unexpected(Error{ETIMEDOUT, fmt::format("{}: no complete mapping table within {} ms ({} bytes so far)",
                                                                who, timeout.count(), text.size())});
        pollfd p{conn, POLLIN | POLLRDHUP, 0};
        const int n = ::poll(&p, 1, static_cast<int>(left));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return lazymig::sys_error(who + ": poll");
        if (n == 0) continue;
        char buf[64 * 1024];
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
        iovec iov{buf, sizeof buf};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        const ssize_t got = ::recvmsg(conn, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (got < 0) return lazymig::sys_error(who + ": recvmsg");
        const std::size_t before = fds.size();
        take_fds(msg, fds);
        if (msg.msg_flags & MSG_CTRUNC)
            return refuse(fmt::format("{}: more file descriptors than fit came with the mappings; "
                                      "Firecracker sends exactly one, the userfaultfd", who));
        if (fds.size() > before && !text.empty())
            return refuse(fmt::format("{}: a file descriptor came after {} bytes of the mapping table; it must "
                                      "come with the first bytes", who, text.size()));
        if (got == 0 && fds.size() == before) {
            // Nothing this time: a zero-length receive is retried while the VMM is there.
            if (p.revents & (POLLRDHUP | POLLHUP | POLLERR))
                return refuse(text.empty() ? fmt::format("{}: the VMM closed the connection before sending the mappings", who)
                                           : fmt::format("{}: the VMM closed the connection after {} bytes of an "
                                                         "incomplete mapping table", who, text.size()));
            continue;
        }
        text.append(buf, static_cast<std::size_t>(got));
        if (text.size() > kMaxMessage)
            return refuse(fmt::format("{}: mapping table longer than {} bytes", who, kMaxMessage));
        // Complete once it parses; a parse error at its very end means "more to come".
        try {
            (void)nlohmann::json::parse(text);
        } catch (const nlohmann::json::parse_error& e) {
            if (std::string_view(e.what()).find("unexpected end of input") != std::string_view::npos) continue;
        }
        break;
    }
    if (fds.empty())
        return refuse(fmt::format("{}: no userfaultfd came with the mappings (no SCM_RIGHTS file descriptor)", who));
    if (fds.size() > 1)
        return refuse(fmt::format("{}: {} file descriptors came with the mappings; Firecracker sends exactly one, "
                                  "the userfaultfd", who, fds.size()));
    auto mappings = parse_mappings(text);
    if (!mappings) return std::unexpected(mappings.error().wrap(who));
    if (auto r = check_registered(h.pid, *mappings); !r) return std::unexpected(r.error().wrap(who));
    h.mappings = std::move(*mappings);
    h.uffd = std::move(fds.front());
    return h;
}

lazymig::Result<std::vector<Mapping>> parse_mappings(std::string_view text) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
        return refuse(fmt::format("the mapping table is not valid JSON ({})", e.what()));
    }
    if (!j.is_array()) return refuse("the mapping table is not a JSON array of GuestRegionUffdMapping");
    if (j.empty()) return refuse("the mapping table is empty");
    if (j.size() > kMaxMappings) return refuse(fmt::format("{} mappings: at most {}", j.size(), kMaxMappings));
    std::vector<Mapping> out;
    for (std::size_t i = 0; i < j.size(); ++i) {
        const auto& e = j[i];
        const std::string where = fmt::format("mapping {}", i);
        if (!e.is_object()) return refuse(where + ": not a JSON object");
        auto field = [&](const char* name, bool required) -> lazymig::Result<std::optional<std::uint64_t>> {
            if (!e.contains(name)) {
                if (required) return refuse(fmt::format("{}: no \"{}\"", where, name));
                return std::nullopt;
            }
            if (!e[name].is_number_unsigned())
                return refuse(fmt::format("{}: \"{}\" is not an unsigned integer ({})", where, name, e[name].dump()));
            return e[name].get<std::uint64_t>();
        };
        auto base = field("base_host_virt_addr", true);
        if (!base) return std::unexpected(base.error());
        auto size = field("size", true);
        if (!size) return std::unexpected(size.error());
        auto offset = field("offset", true);
        if (!offset) return std::unexpected(offset.error());
        auto ps = field("page_size", false);
        if (!ps) return std::unexpected(ps.error());
        auto ps_kib = field("page_size_kib", false);  // deprecated; holds bytes despite its name
        if (!ps_kib) return std::unexpected(ps_kib.error());
        if (*ps && *ps_kib && **ps != **ps_kib)
            return refuse(fmt::format("{}: page_size {} and page_size_kib {} differ (both hold bytes)", where, **ps, **ps_kib));
        // Firecracker before 1.7 sent neither: 4 KiB pages.
        Mapping m{**base, **size, **offset, ps->value_or(ps_kib->value_or(4096))};
        if (m.page_size != 4096 && m.page_size != (2u << 20))
            return refuse(fmt::format("{}: page size {} (a Firecracker VM has 4096 or 2097152)", where, m.page_size));
        if (m.base % m.page_size || m.size % m.page_size || m.offset % m.page_size)
            return refuse(fmt::format("{} {} offset {:#x}: not aligned to its page size {}", where, hex_range(m), m.offset,
                                      m.page_size));
        if (m.size == 0) return refuse(fmt::format("{} at {:#x}: size 0", where, m.base));
        constexpr std::uint64_t kUserTop = 1ull << 47;  // x86-64 and arm64 user space with 4-level tables
        if (m.base == 0 || m.base >= kUserTop || m.size > kUserTop - m.base)
            return refuse(fmt::format("{} {}: outside the user address space", where, hex_range(m)));
        if (m.offset > ~0ull - m.size) return refuse(fmt::format("{}: offset {:#x} + size overflows", where, m.offset));
        out.push_back(m);
    }
    std::vector<std::size_t> order(out.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](auto a, auto b) { return out[a].base < out[b].base; });
    for (std::size_t k = 1; k < order.size(); ++k) {
        const Mapping &a = out[order[k - 1]], &b = out[order[k]];
        if (b.base < a.base + a.size)
            return refuse(fmt::format("mapping {} {} overlaps mapping {} {}", order[k], hex_range(b), order[k - 1],
                                      hex_range(a)));
    }
    return out;
}

lazymig::Result<void> check_registered(pid_t pid, const std::vector<Mapping>& mappings) {
    const std::string path = fmt::format("/proc/{}/smaps", pid);
    std::ifstream in(path);
    if (!in) return lazymig::sys_error(fmt::format("checking the mappings against the VMM's memory: open {}", path));
    // VMAs registered for MISSING faults, sorted by start (smaps lists them in order).
    std::vector<std::pair<std::uint64_t, std::uint64_t>> um;
    std::string line;
    std::uint64_t lo = 0, hi = 0;
    while (std::getline(in, line)) {
        std::uint64_t a, b;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2 && line.find('-') < line.find(' ')) {
            lo = a;
            hi = b;
        } else if (line.rfind("VmFlags:", 0) == 0) {
            std::istringstream flags(line.substr(8));
            for (std::string f; flags >> f;)
                if (f == "um") um.emplace_back(lo, hi);
        }
    }
    for (std::size_t i = 0; i < mappings.size(); ++i) {
        const Mapping& m = mappings[i];
        std::uint64_t at = m.base;
        for (const auto& [a, b] : um)
            if (a <= at && at < b) at = b;
        if (at < m.base + m.size)
            return refuse(fmt::format("mapping {} {}: bytes from {:#x} are not registered with a userfaultfd for "
                                      "MISSING faults in the VMM (no \"um\" among their VmFlags in {})",
                                      i, hex_range(m), at, path));
    }
    return {};
}

}  // namespace uffd_handler
