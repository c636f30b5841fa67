// The page-state table's transitions, including STAGED and the way back to MISSING.
#include <doctest/doctest.h>

#include "src/page_state.hpp"

using lazymig::PageState;
using lazymig::PageStateTable;

TEST_CASE("page-state/fault-then-claim-then-present") {
    PageStateTable t(4);
    CHECK(t.get(0) == PageState::missing);
    CHECK(t.mark_requested(0));
    CHECK_FALSE(t.mark_requested(0));
    CHECK(t.claim(0));
    CHECK_FALSE(t.claim(0));  // one winner
    t.set_present(0);
    CHECK(t.get(0) == PageState::present);
    CHECK_FALSE(t.claim(0));
    CHECK_FALSE(t.mark_requested(0));
}

TEST_CASE("page-state/unclaim-returns-to-requested") {
    PageStateTable t(1);
    CHECK(t.claim(0));
    t.unclaim(0);
    CHECK(t.get(0) == PageState::requested);
    CHECK(t.claim(0));
}

TEST_CASE("page-state/staged-is-claimed-to-map-or-overwrite") {
    PageStateTable t(2);
    CHECK(t.claim(0));
    t.set_staged(0);
    CHECK(t.get(0) == PageState::staged);
    CHECK_FALSE(t.mark_requested(0));  // a fault on it maps it, it asks no one
    CHECK(t.claim_staged(0));
    CHECK_FALSE(t.claim_staged(0));
    t.set_present(0);
    CHECK(t.get(0) == PageState::present);
    // A newer copy takes a staged page with an ordinary claim; claim_staged wants STAGED only.
    CHECK_FALSE(t.claim_staged(1));
    CHECK(t.claim(1));
    t.set_staged(1);
    CHECK(t.claim(1));
    CHECK(t.get(1) == PageState::placing);
}

TEST_CASE("page-state/stale-pages-go-back-to-missing") {
    PageStateTable t(5);
    CHECK(t.claim(0));
    t.set_present(0);
    CHECK(t.make_missing(0));
    CHECK(t.get(0) == PageState::missing);
    CHECK(t.mark_requested(0));  // faults again, fetched again
    CHECK(t.claim(1));
    t.set_staged(1);
    CHECK(t.make_missing(1));
    CHECK(t.get(1) == PageState::missing);
    // Only PRESENT and STAGED go back: missing, requested and placing pages are left alone.
    CHECK_FALSE(t.make_missing(2));
    CHECK(t.mark_requested(3));
    CHECK_FALSE(t.make_missing(3));
    CHECK(t.get(3) == PageState::requested);
    CHECK(t.claim(4));
    CHECK_FALSE(t.make_missing(4));
    CHECK(t.get(4) == PageState::placing);
}
