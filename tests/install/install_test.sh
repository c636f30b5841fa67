#!/usr/bin/env bash
# install/build-against — see meson.build beside this file.
# Usage: install_test.sh BUILD_DIR SOURCE_DIR
#
# The install goes to a DESTDIR (the build's prefix stays /usr/local), so pkg-config is
# told the staging root with PKG_CONFIG_SYSROOT_DIR, which it prepends to -I and -L:
# exactly what a distribution's staged build does. Nothing else points into the tree.
set -euo pipefail
if [ "${LAZYMIG_SANITIZE:-none}" != none ]; then
    # A sanitized liblazymig needs its sanitizer's runtime loaded first, which the plain
    # programs built here against it do not do: nothing this test checks would hold.
    echo "install/build-against: skipped: this build is sanitized (${LAZYMIG_SANITIZE})"
    exit 77
fi
build=$(cd "$1" && pwd) src=$(cd "$2" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lazymig-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
fail() { echo "install/build-against: FAIL: $*" >&2; exit 1; }

meson install -C "$build" --no-rebuild --destdir "$root" >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log" >&2; fail "meson install --destdir $root"; }

pc=$(find "$root" -name lazymig.pc -path '*/pkgconfig/*' | head -n 1)
[ -n "$pc" ] || fail "no lazymig.pc installed under $root"
for h in lazymig.h lazymig.hpp error.hpp export.h version.h; do
    [ -n "$(find "$root" -path "*/include/lazymig/$h")" ] || fail "header lazymig/$h not installed"
done
if grep -q -e "$build" -e "$src" "$pc"; then fail "$pc names the build or source tree:"$'\n'"$(cat "$pc")"; fi

export PKG_CONFIG_PATH=$(dirname "$pc") PKG_CONFIG_SYSROOT_DIR=$root
cflags=$(pkg-config --cflags lazymig) || fail "pkg-config --cflags lazymig"
libs=$(pkg-config --libs lazymig) || fail "pkg-config --libs lazymig"
echo "pkg-config: cflags=[$cflags] libs=[$libs]"

# The installed library: a SONAME with the ABI number, and only the API exported.
lib=$(find "$root" -name 'liblazymig.so.*.*.*' -type f | head -n 1)
[ -n "$lib" ] || fail "no versioned liblazymig.so.X.Y.Z installed"
soname=$(readelf -d "$lib" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
[[ $soname =~ ^liblazymig\.so\.[0-9]+$ ]] || fail "SONAME of $lib is '$soname', want liblazymig.so.N"
[ -e "$(dirname "$lib")/$soname" ] || fail "no $soname link beside $lib"
[ -e "$(dirname "$lib")/liblazymig.so" ] || fail "no liblazymig.so development link beside $lib"
nm -D --defined-only "$lib" | c++filt | cut -d" " -f3- | sed "s/@@*LAZYMIG_[0-9]*$//" >"$tmp/symbols"
api='^(lazymig_[a-z_]+|LAZYMIG_[0-9]+'
api+='|lazymig::(Source|Destination|GuestMemory)::(~?[A-Za-z_]+|operator[^(]+)\(.*\)'
api+='|lazymig::(to_string|parse_backing|parse_mode|default_bulk_channels)\(.*\)'
api+='|(typeinfo|typeinfo name|vtable) for lazymig::(Source|Destination|GuestMemory))$'
if grep -Ev "$api" "$tmp/symbols" >"$tmp/extra"; then
    fail "liblazymig exports $(wc -l <"$tmp/extra") symbols outside the API:"$'\n'"$(head -n 40 "$tmp/extra")"
fi
echo "exported symbols: $(wc -l <"$tmp/symbols") ($soname)"
for want in lazymig_version lazymig_source_create 'lazymig::Source::create(' 'typeinfo for lazymig::Destination'; do
    grep -qF "$want" "$tmp/symbols" || fail "the API symbol '$want' is not exported"
done

# A C program: the embedding example, built and run against the installed library.
# shellcheck disable=SC2086  # pkg-config's output is a list of words
${CC:-cc} -std=c11 -Wall -Werror -o "$tmp/embed" "$src/examples/embed/embed.c" $cflags $libs ||
    fail "building examples/embed/embed.c with pkg-config's flags"
libdir=$(dirname "$lib")
readelf -d "$tmp/embed" | grep -q "NEEDED.*\[$soname\]" || fail "embed does not link $soname"
LD_LIBRARY_PATH=$libdir "$tmp/embed" 8 >"$tmp/embed.log" 2>&1 ||
    { cat "$tmp/embed.log" >&2; fail "embed against the installed library"; }
tail -n 2 "$tmp/embed.log"

# A C++ program: the C++ API's classes, their typeinfo and std::expected returns.
# shellcheck disable=SC2086
${CXX:-c++} -std=c++23 -Wall -Werror -o "$tmp/api_check" "$src/tests/install/api_check.cpp" $cflags $libs ||
    fail "building tests/install/api_check.cpp with pkg-config's flags"
LD_LIBRARY_PATH=$libdir "$tmp/api_check" || fail "api_check against the installed library"
echo "install/build-against: ok"
