// Main for test executables whose every case needs root (capabilities to drop, or one
// only root has). Any other user gets exit code 77, which meson and scripts/test count
// as skipped, instead of failures that say nothing about the code.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdio>

int main(int argc, char** argv) {
    if (::geteuid() != 0) {
        std::fprintf(stderr, "skip: these cases need root (euid %u)\n", static_cast<unsigned>(::geteuid()));
        return 77;
    }
    return doctest::Context(argc, argv).run();
}
