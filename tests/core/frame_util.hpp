// tests/core/frame_util.hpp — splitting an encoded frame back into header and payload.
#pragma once

#include <doctest/doctest.h>

#include <cstring>
#include <span>
#include <string>

#include "src/crc32c.hpp"
#include "src/protocol.hpp"

namespace core_test {

namespace proto = lazymig::proto;

template <class T>
std::string err_of(const lazymig::Result<T>& r) {
    return r ? std::string("(no error)") : r.error().message();
}

inline std::span<const std::byte, proto::kHeaderSize> head_of(const proto::Frame& f) {
    REQUIRE(f.size() >= proto::kHeaderSize);
    return std::span<const std::byte, proto::kHeaderSize>(f.data(), proto::kHeaderSize);
}

inline std::span<const std::byte> payload_of(const proto::Frame& f) {
    return std::span<const std::byte>(f).subspan(proto::kHeaderSize);
}

// Parses the header as a receiver would and verifies length and checksum.
inline proto::Header parse_verified(const proto::Frame& f, proto::Type want) {
    auto h = proto::parse_header(head_of(f), "test channel");
    REQUIRE_MESSAGE(h.has_value(), err_of(h));
    CHECK(h->type == want);
    CHECK(h->length == f.size() - proto::kHeaderSize);
    CHECK(proto::frame_checksum(head_of(f), payload_of(f)) == h->checksum);
    return *h;
}

template <class T>
void put_le(std::byte* p, T v) {
    std::memcpy(p, &v, sizeof v);  // the tests run on little-endian x86-64
}

inline std::byte b(unsigned v) { return std::byte{static_cast<unsigned char>(v)}; }

}  // namespace core_test
