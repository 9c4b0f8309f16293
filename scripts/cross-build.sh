#!/usr/bin/env bash
# Cross-builds the tb-agent .deb for arm64 and armhf with Debian's cross toolchains and multiarch
# -dev packages, then smoke-runs each binary under qemu-user: --version, and --check-config and
# --test of the shipped config. The agent only: no tests, no benchmarks.
#
# Usage: scripts/cross-build.sh [arm64|armhf ...]        (default: arm64 armhf; as root)
# Packages land in build-cross/<arch>/tb-agent_<version>_<arch>.deb.
#
# Adds the foreign architectures to dpkg and installs crossbuild-essential-<arch>, qemu-user and
# the -dev packages for <arch>. libyaml-cpp-dev is not Multi-Arch: same (installing the foreign
# one would remove the native one), so its foreign .debs are unpacked into
# build-cross/<arch>/sysroot instead, and the build takes yaml-cpp from there.
set -euo pipefail
cd "$(dirname "$0")/.."

arches=("$@")
((${#arches[@]})) || arches=(arm64 armhf)
export DEBIAN_FRONTEND=noninteractive

declare -A triplet=([arm64]=aarch64-linux-gnu [armhf]=arm-linux-gnueabihf)
declare -A processor=([arm64]=aarch64 [armhf]=arm)
declare -A qemu=([arm64]=qemu-aarch64 [armhf]=qemu-arm)

added=()
for arch in "${arches[@]}"; do
  [[ -n ${triplet[$arch]:-} ]] || { echo "unknown architecture: $arch" >&2; exit 2; }
  dpkg --print-foreign-architectures | grep -qx "$arch" || added+=("$arch")
  dpkg --add-architecture "$arch"
done
# An architecture whose package lists cannot be fetched would make every later `apt-get update`
# on this machine fail: take back the ones this run added, and stop.
if ! apt-get update -q >/dev/null; then
  for arch in "${added[@]}"; do dpkg --remove-architecture "$arch"; done
  echo "apt-get update failed for ${arches[*]}; foreign architectures left as they were" >&2
  exit 1
fi
wanted=(qemu-user file)
for arch in "${arches[@]}"; do
  wanted+=("crossbuild-essential-$arch" "libcoap3-dev:$arch" "libsystemd-dev:$arch"
           "libsqlite3-dev:$arch" "libspdlog-dev:$arch" "libfmt-dev:$arch")
done
# Never let the cross packages replace native ones the rest of the project builds with.
if apt-get install -s -y --no-install-recommends "${wanted[@]}" | grep -q '^Remv '; then
  apt-get install -s -y --no-install-recommends "${wanted[@]}" | grep '^Remv ' >&2
  echo "installing the cross packages would remove the packages above; stopping" >&2
  exit 1
fi
apt-get install -q -y --no-install-recommends "${wanted[@]}" >/dev/null

for arch in "${arches[@]}"; do
  t=${triplet[$arch]}
  dir=build-cross/$arch
  start=$SECONDS
  echo "== $arch ($t)"
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
    { tail -40 "$dir/build.log"; echo "== $arch: build FAILED" >&2; exit 1; }
  # dpkg-shlibdeps looks the libraries up for the host architecture it is told.
  (cd "$dir" && DEB_HOST_ARCH=$arch cpack -G DEB >/dev/null)
  ls -1 "$dir"/tb-agent_*_"$arch".deb

  echo "-- smoke run under ${qemu[$arch]}"
  run=("${qemu[$arch]}" -L "/usr/$t" "$dir/src/tb-agent")
  "${run[@]}" --version
  "${run[@]}" --check-config --config config/tb-agent.yaml
  "${run[@]}" --test --config config/tb-agent.yaml --log-target stderr >/dev/null
  file "$dir/src/tb-agent" | sed 's/, BuildID[^,]*//'
  echo "== $arch: $((SECONDS - start)) s"
done
