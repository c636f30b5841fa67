// parse_uri: what a destination may be told to listen on or a source to connect to.
#include <doctest/doctest.h>

#include "src/net/socket.hpp"

using lazymig::net::parse_uri;

namespace {

std::string error_of(std::string_view uri) {
    auto r = parse_uri(uri);
    return r ? "(accepted " + r->uri() + ")" : r.error().message();
}

}  // namespace

TEST_CASE("uri/accepts-tcp-endpoints") {
    auto v4 = parse_uri("tcp:127.0.0.1:4444");
    REQUIRE_MESSAGE(v4.has_value(), v4.error().message());
    CHECK(v4->host == "127.0.0.1");
    CHECK(v4->port == 4444);
    CHECK(v4->uri() == "tcp:127.0.0.1:4444");

    auto v6 = parse_uri("tcp:[::1]:0");
    REQUIRE_MESSAGE(v6.has_value(), v6.error().message());
    CHECK(v6->host == "::1");
    CHECK(v6->port == 0);
    CHECK(v6->uri() == "tcp:[::1]:0");

    auto local = parse_uri("tcp:localhost:1");
    REQUIRE_MESSAGE(local.has_value(), local.error().message());
    CHECK(local->host == "127.0.0.1");
    CHECK(local->port == 1);

    auto top = parse_uri("tcp:0.0.0.0:65535");
    REQUIRE_MESSAGE(top.has_value(), top.error().message());
    CHECK(top->port == 65535);
}

TEST_CASE("uri/rejects-with-the-part-named") {
    CHECK(error_of("rdma:10.0.0.2:4444") ==
          "uri 'rdma:10.0.0.2:4444': expected tcp:HOST:PORT (other transports: rdma: is not built in)");
    CHECK(error_of("") == "uri '': expected tcp:HOST:PORT (other transports: rdma: is not built in)");
    CHECK(error_of("tcp:127.0.0.1") == "uri 'tcp:127.0.0.1': missing :PORT");
    CHECK(error_of("tcp:127.0.0.1:") == "uri 'tcp:127.0.0.1:': port '' is not a number from 0 to 65535");
    CHECK(error_of("tcp:127.0.0.1:70000") ==
          "uri 'tcp:127.0.0.1:70000': port '70000' is not a number from 0 to 65535");
    CHECK(error_of("tcp:127.0.0.1:44a") == "uri 'tcp:127.0.0.1:44a': port '44a' is not a number from 0 to 65535");
    CHECK(error_of("tcp:127.0.0.1:-1") == "uri 'tcp:127.0.0.1:-1': port '-1' is not a number from 0 to 65535");
    CHECK(error_of("tcp::4444") == "uri 'tcp::4444': empty host");
    CHECK(error_of("tcp:[]:4444") == "uri 'tcp:[]:4444': empty host");
    CHECK(error_of("tcp:[::1]") == "uri 'tcp:[::1]': IPv6 host must be written [ADDR]:PORT");
    CHECK(error_of("tcp:[::1]4444") == "uri 'tcp:[::1]4444': IPv6 host must be written [ADDR]:PORT");
}
