// Built by install_test.sh against the installed headers and library alone: every
// public C++ entry point it uses must be exported, with the typeinfo a VMM relies on.
// Exits 0 when all checks hold, 1 naming the first that does not.
#include <cstdio>
#include <cstring>
#include <string>
#include <typeinfo>

#include <lazymig/lazymig.h>
#include <lazymig/lazymig.hpp>

namespace {
int failed(const std::string& what) {
    std::fprintf(stderr, "api_check: %s\n", what.c_str());
    return 1;
}
}  // namespace

int main() {
    if (std::strcmp(lazymig_version(), LAZYMIG_VERSION_STRING) != 0)
        return failed(std::string("lazymig_version() is ") + lazymig_version() + ", headers say " + LAZYMIG_VERSION_STRING);
    static_assert(LAZYMIG_VERSION_NUMBER ==
                  ((LAZYMIG_VERSION_MAJOR << 16) | (LAZYMIG_VERSION_MINOR << 8) | LAZYMIG_VERSION_MICRO));

    auto mode = lazymig::parse_mode("hybrid");
    if (!mode || lazymig::to_string(*mode) != "hybrid") return failed("parse_mode/to_string round trip");
    if (lazymig::parse_backing("floppy")) return failed("parse_backing accepted 'floppy'");
    if (lazymig::default_bulk_channels() < 1) return failed("default_bulk_channels() < 1");

    auto ram = lazymig::GuestMemory::create("ram0", 1 << 20, lazymig::Backing::memfd, false);
    if (!ram) return failed("GuestMemory::create: " + ram.error().message());
    lazymig::VmmHooks hooks{
        .pause_vcpus = [] {}, .resume_vcpus = [] {},
        .save_device_state = []() -> lazymig::Result<std::vector<std::byte>> { return std::vector<std::byte>{}; },
        .load_device_state = [](std::span<const std::byte>) -> lazymig::Result<void> { return {}; }};

    // Refused with a sentence: an error value crosses the library boundary intact.
    auto bad = lazymig::Source::create({.regions = {ram->region()}, .hooks = hooks, .uri = "udp:nowhere"});
    if (bad) return failed("Source::create accepted uri udp:nowhere");
    if (bad.error().message().empty()) return failed("Source::create's error has no sentence");

    // Accepted (validation only, nothing starts); destroyed through the base's vtable.
    auto src = lazymig::Source::create({.regions = {ram->region()}, .hooks = hooks, .uri = "tcp:127.0.0.1:9",
                                        .security = {.auth = lazymig::Auth::psk,
                                                     .psk = std::vector<std::byte>(32, std::byte{7})}});
    if (!src) return failed("Source::create: " + src.error().message());
    lazymig::Source& base = **src;
    if (typeid(base) == typeid(lazymig::Source)) return failed("typeid of an implementation equals the abstract Source");
    if (dynamic_cast<lazymig::Source*>(&base) != &base) return failed("dynamic_cast to lazymig::Source");
    if ((*src)->stats().phase != lazymig::Phase::idle)
        return failed(std::string("a new Source is in phase ") + std::string(lazymig::to_string((*src)->stats().phase)));
    src->reset();
    std::printf("api_check: lazymig %s, C++ API ok\n", lazymig_version());
    return 0;
}
