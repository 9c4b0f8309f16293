#!/usr/bin/env bash
# Builds the tb-agent .deb and .rpm the way a distribution builds a package: build type None with
# Debian's own compiler and linker flags (dpkg-buildflags, all hardening on), only the tb-agent
# target, then CPack (packaging/Packaging.cmake, packaging/README.md).
#
# Usage: scripts/build-packages.sh [BUILD_DIR] [extra cmake arguments]
#   BUILD_DIR defaults to build-pkg; the packages land in it as
#   tb-agent_<version>_<arch>.deb and tb-agent-<version>-1.<arch>.rpm, and the plugin SDK
#   (CPackDevConfig.cmake) as tb-agent-dev_<version>_<arch>.deb and
#   tb-agent-devel-<version>-1.<arch>.rpm.
#   scripts/build-packages.sh build-pkg-next -DTB_VERSION_OVERRIDE=0.1.1   # an upgrade to test
# TB_PACKAGE_GENERATORS="DEB" builds only the .deb (default "DEB RPM"; RPM needs rpmbuild).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build-pkg}
(($#)) && shift

# Passed explicitly (CMake reads CFLAGS and friends only when it creates a build directory) and
# with CPPFLAGS (-D_FORTIFY_SOURCE) added, which CMake ignores, as debhelper's cmake support does.
eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --export=sh)"
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=None -DCMAKE_INSTALL_PREFIX=/usr -DTB_BUILD_TESTS=OFF \
  -DTB_BUILD_BENCH=OFF -DCMAKE_C_FLAGS="$CFLAGS $CPPFLAGS" -DCMAKE_CXX_FLAGS="$CXXFLAGS $CPPFLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="$LDFLAGS" "$@" >/dev/null
cmake --build "$dir" -j"$(nproc)" --target tb-agent
for generator in ${TB_PACKAGE_GENERATORS:-DEB RPM}; do
  for config in CPackConfig.cmake CPackDevConfig.cmake; do
    (cd "$dir" && cpack -G "$generator" --config "$config" >/dev/null)
  done
done
# Lists what was built; with TB_PACKAGE_GENERATORS=DEB there is no .rpm, which is no error.
ls -1 "$dir"/tb-agent[_-]*.deb "$dir"/tb-agent-*.rpm 2>/dev/null || true
