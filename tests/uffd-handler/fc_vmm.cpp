#include "fc_vmm.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

namespace fc {

Vmm::~Vmm() {
    for (const auto& r : regions_) ::munmap(r.host, r.size);
}

lazymig::Result<Vmm> Vmm::create(const std::vector<std::size_t>& sizes) {
    Vmm v;
    std::uint64_t offset = 0;
    for (std::size_t size : sizes) {
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return lazymig::sys_error("fc: mmap guest region");
        v.regions_.push_back({static_cast<std::byte*>(p), size, offset});
        offset += size;
    }
    v.uffd_.reset(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
    if (!v.uffd_) return lazymig::sys_error("fc: userfaultfd(O_CLOEXEC | O_NONBLOCK)");
    uffdio_api api{.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE, .ioctls = 0};
    if (::ioctl(v.uffd_.get(), UFFDIO_API, &api) != 0) return lazymig::sys_error("fc: UFFDIO_API with EVENT_REMOVE");
    for (const auto& r : v.regions_) {
        uffdio_register reg{.range = {reinterpret_cast<std::uint64_t>(r.host), r.size}, .mode = UFFDIO_REGISTER_MODE_MISSING,
                            .ioctls = 0};
        if (::ioctl(v.uffd_.get(), UFFDIO_REGISTER, &reg) != 0) return lazymig::sys_error("fc: UFFDIO_REGISTER");
    }
    return v;
}

std::string Vmm::mappings_json() const {
    std::string out = "[";
    for (const auto& r : regions_) {
        if (out.size() > 1) out += ',';
        out += fmt::format(R"({{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":4096,"page_size_kib":4096}})",
                           reinterpret_cast<std::uint64_t>(r.host), r.size, r.offset);
    }
    return out + "]";
}

lazymig::Result<void> Vmm::send(const std::string& path, const std::string& text, const std::vector<int>& fds) {
    sock_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!sock_) return lazymig::sys_error("fc: socket");
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    if (::connect(sock_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return lazymig::sys_error("fc: connect " + path);
    iovec iov{const_cast<char*>(text.data()), text.size()};
    std::vector<char> control(CMSG_SPACE(sizeof(int) * std::max<std::size_t>(fds.size(), 1)));
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!fds.empty()) {
        msg.msg_control = control.data();
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    if (::sendmsg(sock_.get(), &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(text.size()))
        return lazymig::sys_error("fc: sendmsg the mappings");
    return {};
}

std::uint64_t word_at(std::uint64_t off) { return (off + 1) * 0x9E3779B97F4A7C15ull; }
bool zero_page(std::uint64_t off) { return off / 4096 % 7 == 3; }

lazymig::Result<void> write_snapshot(const std::string& path, std::uint64_t bytes) {
    vmm::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd) return lazymig::sys_error("open " + path);
    std::vector<std::uint64_t> buf((1 << 20) / 8);
    for (std::uint64_t at = 0; at < bytes; at += 1 << 20) {
        const std::size_t n = std::min<std::uint64_t>(1 << 20, bytes - at);
        for (std::size_t i = 0; i < n / 8; ++i) buf[i] = zero_page(at + i * 8) ? 0 : word_at(at + i * 8);
        if (::pwrite(fd.get(), buf.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n))
            return lazymig::sys_error("write " + path);
    }
    return {};
}

std::string check_page(const Region& r, std::uint64_t page, bool expect_zero) {
    const auto* w = reinterpret_cast<const std::uint64_t*>(r.host + page * 4096);
    for (std::size_t i = 0; i < 512; ++i) {
        const std::uint64_t off = r.offset + page * 4096 + i * 8;
        const std::uint64_t want = expect_zero || zero_page(off) ? 0 : word_at(off);
        if (w[i] != want)
            return fmt::format("region at file offset {} page {} word {}: {:#x}, expected {:#x}", r.offset, page, i, w[i], want);
    }
    return {};
}

}  // namespace fc
