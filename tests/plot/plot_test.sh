#!/usr/bin/env bash
# bench/plot: `scripts/bench --quick --plot DIR` exits 0 and leaves three PNGs in DIR,
# each a real PNG (signature bytes) of a size no empty chart has.
# Usage: plot_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
src=$(cd "$1" && pwd) build=$(cd "$2" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lazymig-plot.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() { echo "bench/plot: FAIL: $*" >&2; exit 1; }

LAZYMIG_BUILD=$build "$src/scripts/bench" --quick --plot "$tmp/plots" >"$tmp/out.txt" 2>&1 ||
    { tail -n 40 "$tmp/out.txt" >&2; fail "scripts/bench --quick --plot exited non-zero"; }
for png in fault-latency-cdf pages-present push-throughput; do
    f=$tmp/plots/$png.png
    [ -f "$f" ] || { tail -n 20 "$tmp/out.txt" >&2; fail "$png.png was not written"; }
    magic=$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')
    [ "$magic" = 89504e470d0a1a0a ] || fail "$png.png does not start with the PNG signature (got $magic)"
    size=$(stat -c %s "$f")
    [ "$size" -ge 10000 ] || fail "$png.png is $size bytes: too small to hold a chart with data"
    echo "$png.png: PNG, $size bytes"
done
echo "bench/plot: ok"
