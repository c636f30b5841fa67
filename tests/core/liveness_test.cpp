// Every migration socket gives up on a silent peer within kDeadPeerAfter: both ends of a
// connection made by connect_tcp / accept_tcp carry keepalive and TCP_USER_TIMEOUT.
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "src/net/socket.hpp"

namespace {

using namespace lazymig::net;

int opt(int fd, int level, int name) {
    int v = -1;
    socklen_t len = sizeof v;
    REQUIRE(::getsockopt(fd, level, name, &v, &len) == 0);
    return v;
}

void check_liveness(int fd) {
    CHECK(opt(fd, SOL_SOCKET, SO_KEEPALIVE) == 1);
    CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPIDLE) == kProbeIdle.count());
    CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPINTVL) == kProbeInterval.count());
    CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPCNT) == kProbeCount);
    CHECK(opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT) == std::chrono::milliseconds(kDeadPeerAfter).count());
}

}  // namespace

TEST_CASE("socket/both-ends-give-up-on-a-silent-peer") {
    auto at = parse_uri("tcp:127.0.0.1:0");
    REQUIRE(at.has_value());
    auto listener = listen_tcp(*at);
    REQUIRE_MESSAGE(listener.has_value(), listener.error().message());
    auto local = local_endpoint(listener->get());
    REQUIRE(local.has_value());
    auto stop = ShutdownEvent::create();
    REQUIRE(stop.has_value());
    auto client = connect_tcp(*local, stop->fd(), std::chrono::seconds(5), false);
    REQUIRE_MESSAGE(client.has_value(), client.error().message());
    auto server = accept_tcp(listener->get(), stop->fd(), std::chrono::seconds(5));
    REQUIRE_MESSAGE(server.has_value(), server.error().message());
    check_liveness(client->get());
    check_liveness(server->get());
    CHECK(kDeadPeerAfter == std::chrono::seconds(30));
}
