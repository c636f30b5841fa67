# Sourced by scripts/demo, scripts/test and scripts/bench: installs what is missing
# (Debian 12 packages) and builds into ./build with meson/ninja.
# Environment: LAZYMIG_BUILD=DIR builds there instead; LAZYMIG_MESON_OPTIONS="-Dx=y ..."
# are given to `meson setup` when DIR is set up (scripts/test --sanitize uses both).
set -euo pipefail

LAZYMIG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAZYMIG_BUILD=${LAZYMIG_BUILD:-$LAZYMIG_ROOT/build}
LAZYMIG_MESON_OPTIONS=${LAZYMIG_MESON_OPTIONS:-}
LAZYMIG_PACKAGES=(g++ meson ninja-build pkg-config python3 iproute2
    liburing-dev libssl-dev liblz4-dev libfmt-dev doctest-dev libcli11-dev nlohmann-json3-dev
    libibverbs-dev librdmacm-dev
    qemu-system-x86 busybox-static rdma-core ibverbs-providers ibverbs-utils rdmacm-utils perftest kmod cpio
    socat gnuplot-nox)   # the QMP session test drives the socket with socat; bench --plot

lazymig_install() {
    local missing=()
    for p in "${LAZYMIG_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing ${missing[*]}"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q </dev/null
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

lazymig_build() {
    if [ ! -f "$LAZYMIG_BUILD/build.ninja" ]; then
        # shellcheck disable=SC2086  # a list of options
        meson setup $LAZYMIG_MESON_OPTIONS "$LAZYMIG_BUILD" "$LAZYMIG_ROOT" >/dev/null
    fi
    ninja -C "$LAZYMIG_BUILD" >/dev/null || ninja -C "$LAZYMIG_BUILD"
}

lazymig_install
lazymig_build
