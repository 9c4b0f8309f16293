#!/usr/bin/env bash
# Cross-builds the tb-agent .deb for arm64 and armhf with Debian's cross toolchains and multiarch
# -dev packages, then smoke-runs each binary under qemu-user: --version, and --check-config and
# --test of the shipped config. The agent only: no tests, no benchmarks.
#
# Usage: scripts/cross-build.sh [arm64|armhf ...]        (default: arm64 armhf; as root)
# Packages land in build-cross/<arch>/tb-agent_<version>_<arch>.deb.
#
# Two ways to get the foreign -dev packages, tried in this order per architecture:
#  1. On this machine (multiarch): dpkg --add-architecture, crossbuild-essential-<arch> and the
#     -dev packages for <arch>. libyaml-cpp-dev is not Multi-Arch: same (installing the foreign
#     one would remove the native one), so its foreign .debs are unpacked into
#     build-cross/<arch>/sysroot and the build takes yaml-cpp from there.
#  2. In a build root of its own, when (1) is impossible: a foreign package index this machine's
#     mirror cannot serve (seen: the armhf index of bookworm-security failing its hash check), or a
#     foreign library that cannot be co-installed because the native one carries a security
#     update the foreign index lacks (multiarch needs both at the same version: libssl3,
#     linux-libc-dev). The root is a debootstrapped Debian 12 from the release and its point
#     updates only, where native and foreign versions always match; it is cached in
#     /var/cache/tb-agent-cross (TB_CROSS_CACHE) and reused. The binary built there links
#     against the same sonames and gets its Depends from dpkg-shlibdeps the same way.
# TB_CROSS_FORCE_ROOT=1 takes way (2) for every architecture.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A triplet=([arm64]=aarch64-linux-gnu [armhf]=arm-linux-gnueabihf)
declare -A processor=([arm64]=aarch64 [armhf]=arm)
declare -A qemu=([arm64]=qemu-aarch64 [armhf]=qemu-arm)
export DEBIAN_FRONTEND=noninteractive

# The foreign packages the agent builds against (besides libyaml-cpp-dev, see above).
foreign_dev() {
  local arch=$1
  echo "crossbuild-essential-$arch libcoap3-dev:$arch libsystemd-dev:$arch libsqlite3-dev:$arch" \
    "libspdlog-dev:$arch libfmt-dev:$arch"
}

# Configures, builds and packages the agent for $1 in build-cross/$1. Runs on this machine or,
# with the tree mounted at /src, inside the build root.
build_agent() {
  local arch=$1 t=${triplet[$1]} dir=build-cross/$1
  # A build directory configured on this machine cannot be reused in the build root (other path).
  if [[ -f $dir/CMakeCache.txt ]] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD" "$dir/CMakeCache.txt"; then
    rm -rf "$dir"
  fi
  mkdir -p "$dir/sysroot" "$dir/debs"
  (cd "$dir/debs" && apt-get download -q "libyaml-cpp-dev:$arch" "libyaml-cpp0.7:$arch" >/dev/null)
  for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/sysroot"; done

  cat >"$dir/toolchain.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR ${processor[$arch]})
set(CMAKE_C_COMPILER $t-gcc)
set(CMAKE_CXX_COMPILER $t-g++)
set(CMAKE_LIBRARY_ARCHITECTURE $t)
EOF
  # pkg-config reads the foreign architecture's .pc files only.
  PKG_CONFIG_LIBDIR=/usr/lib/$t/pkgconfig:/usr/share/pkgconfig \
    cmake -S . -B "$dir" -DCMAKE_TOOLCHAIN_FILE="$PWD/$dir/toolchain.cmake" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
    -DTB_BUILD_TESTS=OFF -DTB_BUILD_BENCH=OFF \
    -Dyaml-cpp_DIR="$PWD/$dir/sysroot/usr/lib/$t/cmake/yaml-cpp" \
    -DTB_YAML_CPP_ARCHIVE="$PWD/$dir/sysroot/usr/lib/$t/libyaml-cpp.a" \
    -DCPACK_DEBIAN_PACKAGE_ARCHITECTURE="$arch" >/dev/null
  cmake --build "$dir" -j"$(nproc)" --target tb-agent >"$dir/build.log" 2>&1 ||
    { tail -40 "$dir/build.log"; echo "== $arch: build FAILED" >&2; return 1; }
  # dpkg-shlibdeps looks the libraries up for the host architecture it is told.
  (cd "$dir" && DEB_HOST_ARCH=$arch cpack -G DEB >/dev/null)
}

# Way (1): 0 when this machine now has the cross toolchain and foreign -dev packages for $1.
prepare_host() {
  local arch=$1 added=0
  dpkg --print-foreign-architectures | grep -qx "$arch" || added=1
  dpkg --add-architecture "$arch"
  local why=""
  # shellcheck disable=SC2046
  if ! apt-get update -q >/dev/null 2>&1; then
    why="apt-get update cannot fetch every index with $arch added"
  elif ! apt-get install -s -y --no-install-recommends qemu-user file $(foreign_dev "$arch") \
      >/tmp/tb-cross-sim.$$ 2>&1; then
    why="the $arch packages cannot be co-installed with the native ones: $(grep -m3 'Depends' /tmp/tb-cross-sim.$$ | tr -s ' ' | paste -sd';')"
  elif grep -q '^Remv ' /tmp/tb-cross-sim.$$; then
    why="installing the $arch packages would remove: $(grep '^Remv ' /tmp/tb-cross-sim.$$ | cut -d' ' -f2 | paste -sd' ')"
  fi
  rm -f /tmp/tb-cross-sim.$$
  if [[ -n $why ]]; then
    # An architecture whose index cannot be fetched would make every later `apt-get update` on
    # this machine fail: take back what this run added.
    if ((added)); then
      dpkg --remove-architecture "$arch"
      apt-get update -q >/dev/null 2>&1 || true
    fi
    echo "-- not on this machine: $why; using a build root" >&2
    return 1
  fi
  # shellcheck disable=SC2046
  apt-get install -q -y --no-install-recommends qemu-user file $(foreign_dev "$arch") >/dev/null
}

mirror() {
  local f w
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
    [[ -f $f ]] || continue
    for w in $(grep -v '^\s*#' "$f" 2>/dev/null); do
      [[ $w == http*://*/debian || $w == http*://*/debian/ ]] && { echo "${w%/}"; return; }
    done
  done
  echo http://deb.debian.org/debian
}

# Way (2): the cached build root for $1, made when missing. Prints its path.
prepare_root() {
  local arch=$1 cache=${TB_CROSS_CACHE:-/var/cache/tb-agent-cross}
  local root=$cache/bookworm-$arch-root format="1 $(foreign_dev "$arch") libyaml-cpp-dev"
  mkdir -p "$cache"
  if [[ -d $root && "$(cat "$root.format" 2>/dev/null)" == "$format" ]]; then
    echo "$root"
    return
  fi
  rm -rf "$root" "$root.tmp"
  local m
  m=$(mirror)
  echo "-- debootstrapping a Debian 12 build root for $arch into $root (once)" >&2
  debootstrap --variant=minbase bookworm "$root.tmp" "$m" >"$cache/debootstrap-$arch.log" 2>&1 ||
    { tail -20 "$cache/debootstrap-$arch.log" >&2; return 1; }
  # The release and its point updates; no -security (see the top of this file).
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$m" "$m" \
    >"$root.tmp/etc/apt/sources.list"
  cp /etc/resolv.conf "$root.tmp/etc/resolv.conf" 2>/dev/null || true
  # shellcheck disable=SC2046
  chroot "$root.tmp" /bin/sh -c "
    set -e
    export DEBIAN_FRONTEND=noninteractive
    dpkg --add-architecture $arch
    apt-get update -q
    apt-get install -q -y --no-install-recommends cmake pkg-config file dpkg-dev \
      nlohmann-json3-dev libcli11-dev $(foreign_dev "$arch")
    apt-get clean" >"$cache/packages-$arch.log" 2>&1 ||
    { tail -20 "$cache/packages-$arch.log" >&2; return 1; }
  echo "$format" >"$root.format"
  mv "$root.tmp" "$root"
  echo "$root"
}

# Runs build_agent for $2 inside the build root $1, with this tree at /src.
build_in_root() {
  local root=$1 arch=$2
  mkdir -p "$root/src"
  # A private mount namespace: the mounts end with the build, whatever happens to it.
  unshare --mount --propagation private /bin/sh -c "
    set -e
    mount --bind '$PWD' '$root/src'
    mount -t proc proc '$root/proc'
    chroot '$root' /bin/bash -c 'cd /src && TB_CROSS_INSIDE=1 scripts/cross-build.sh $arch'"
}

# Inside the build root: only build (the root has every package).
if [[ ${TB_CROSS_INSIDE:-0} == 1 ]]; then
  build_agent "$1"
  exit
fi

# --prepare-root ARCH...: only make the cached build roots (CI does it in the background while
# the native build runs: debootstrap is mostly download and unpacking).
if [[ ${1:-} == --prepare-root ]]; then
  shift
  for arch in "$@"; do prepare_root "$arch" >/dev/null; done
  exit
fi

arches=("$@")
((${#arches[@]})) || arches=(arm64 armhf)
for arch in "${arches[@]}"; do
  [[ -n ${triplet[$arch]:-} ]] || { echo "unknown architecture: $arch" >&2; exit 2; }
done
apt-get install -q -y --no-install-recommends qemu-user file debootstrap >/dev/null

for arch in "${arches[@]}"; do
  t=${triplet[$arch]}
  dir=build-cross/$arch
  start=$SECONDS
  echo "== $arch ($t)"
  libs=""   # where qemu finds the foreign loader and libraries
  if [[ ${TB_CROSS_FORCE_ROOT:-0} != 1 ]] && prepare_host "$arch"; then
    build_agent "$arch"
    libs=/usr/$t
  else
    root=$(prepare_root "$arch")
    build_in_root "$root" "$arch"
    libs=$root
  fi
  ls -1 "$dir"/tb-agent_*_"$arch".deb
  dpkg-deb -f "$dir"/tb-agent_*_"$arch".deb Depends

  echo "-- smoke run under ${qemu[$arch]}"
  run=("${qemu[$arch]}" -L "$libs" "$dir/src/tb-agent")
  "${run[@]}" --version
  "${run[@]}" --check-config --config config/tb-agent.yaml
  "${run[@]}" --test --config config/tb-agent.yaml --log-target stderr >/dev/null
  file "$dir/src/tb-agent" | sed 's/, BuildID[^,]*//'
  echo "== $arch: $((SECONDS - start)) s"
done
