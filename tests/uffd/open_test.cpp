// tests/uffd/open_test.cpp — probing, the handshake, feature names, the fd's owner.
// The ways to open one without privileges are in root_test.cpp (they need root to drop it).
#include <fcntl.h>

#include "helpers.hpp"

using namespace uffd_test;
using lazymig::uffd::Features;
using lazymig::uffd::feature_name;

TEST_CASE("uffd/probe/reports-the-features-this-machine-needs") {
    auto f = Uffd::probe();
    REQUIRE_MESSAGE(f.has_value(), err_of(f));
    const std::uint64_t needed = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM |
                                 UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_MOVE | UFFD_FEATURE_POISON;
    CHECK_MESSAGE(f->missing(needed).empty(), "kernel lacks " << f->missing(needed));
    CHECK(f->has(needed));
    const std::uint64_t base = 1ull << _UFFDIO_API | 1ull << _UFFDIO_REGISTER | 1ull << _UFFDIO_UNREGISTER;
    CHECK((f->api_ioctls & base) == base);
    const std::string all = f->describe();
    for (const char* name : {"MISSING_SHMEM", "MINOR_SHMEM", "WP_ASYNC", "MOVE", "POISON"})
        CHECK_MESSAGE(all.find(name) != std::string::npos, all);
}

TEST_CASE("uffd/features/names-every-bit") {
    CHECK(feature_name(UFFD_FEATURE_PAGEFAULT_FLAG_WP) == "PAGEFAULT_FLAG_WP");
    CHECK(feature_name(UFFD_FEATURE_MINOR_SHMEM) == "MINOR_SHMEM");
    CHECK(feature_name(UFFD_FEATURE_WP_UNPOPULATED) == "WP_UNPOPULATED");
    CHECK(feature_name(UFFD_FEATURE_MOVE) == "MOVE");
    CHECK(feature_name(1ull << 17) == "bit 17");
    CHECK(feature_name(0) == "none");
    for (unsigned i = 0; i <= 16; ++i) CHECK(feature_name(1ull << i).find("bit") == std::string::npos);

    const Features f{UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_EVENT_FORK};
    CHECK(f.missing(UFFD_FEATURE_MISSING_SHMEM) == "");
    CHECK(f.missing(UFFD_FEATURE_MOVE | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MISSING_SHMEM) ==
          "MINOR_SHMEM, MOVE");
    CHECK(f.describe() == "EVENT_FORK, MISSING_SHMEM");
    CHECK(Features{}.describe() == "none");
}

TEST_CASE("uffd/open/refuses-a-missing-feature-by-name") {
    auto u = Uffd::open(UFFD_FEATURE_MOVE | (1ull << 62));
    REQUIRE_FALSE(u.has_value());
    CHECK(u.error().code == 0);
    CHECK(u.error().message() == "userfaultfd: kernel lacks bit 62");
}

TEST_CASE("uffd/open/enables-what-was-asked-and-owns-the-fd") {
    auto u = Uffd::open(UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_ASYNC);
    REQUIRE_MESSAGE(u.has_value(), err_of(u));
    CHECK(u->valid());
    // The kernel turns WP_UNPOPULATED on with WP_ASYNC.
    CHECK(u->enabled_features() ==
          (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED));
    CHECK(u->features().has(UFFD_FEATURE_MOVE));
    CHECK((::fcntl(u->fd(), F_GETFL) & O_NONBLOCK) != 0);
    CHECK((::fcntl(u->fd(), F_GETFD) & FD_CLOEXEC) != 0);

    const int fd = u->fd();
    Uffd owner = std::move(*u);
    CHECK_FALSE(u->valid());
    CHECK(owner.fd() == fd);
    owner.close();
    owner.close();  // idempotent
    CHECK_FALSE(owner.valid());
    CHECK(::fcntl(fd, F_GETFD) == -1);
    CHECK(errno == EBADF);

    Event ev;
    auto r = owner.read_events({&ev, 1});
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().message() == "read(uffd fd=-1, 32 bytes): Bad file descriptor (errno 9)");
}
