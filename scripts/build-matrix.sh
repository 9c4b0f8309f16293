#!/usr/bin/env bash
# Builds the tb-agent target with the flags users and packagers use, without -Werror (TB_WERROR
# is off by default): a build that only warns must still build. One build directory per flavour
# (build-matrix/<flavour>); only the agent, no tests or benchmarks.
#
# Usage: scripts/build-matrix.sh [flavour...]   (default: all)
#   release      CMAKE_BUILD_TYPE=Release (-O3; g++ 12 warns -Wrestrict inside std::string)
#   minsizerel   CMAKE_BUILD_TYPE=MinSizeRel
#   relwithdebinfo
#   debian       CMAKE_BUILD_TYPE=None with dpkg-buildflags (hardening=+all), as debhelper does
#   fedora       CMAKE_BUILD_TYPE=None with Fedora's %optflags and %build_ldflags (x86_64), minus
#                the -specs=/usr/lib/rpm/redhat/... files only Fedora has
# Each flavour also runs the built agent's --version and --check-config on the shipped config.
set -euo pipefail
cd "$(dirname "$0")/.."

fedora_optflags="-O2 -flto=auto -ffat-lto-objects -fexceptions -g -grecord-gcc-switches -pipe \
-Wall -Werror=format-security -Wp,-D_FORTIFY_SOURCE=2 -Wp,-D_GLIBCXX_ASSERTIONS \
-fstack-protector-strong -m64 -mtune=generic -fasynchronous-unwind-tables \
-fstack-clash-protection -fcf-protection"
fedora_ldflags="-Wl,-z,relro -Wl,--as-needed -Wl,-z,now -flto=auto"

flavours=("$@")
((${#flavours[@]})) || flavours=(release minsizerel relwithdebinfo debian fedora)

for flavour in "${flavours[@]}"; do
  dir=build-matrix/$flavour
  args=(-DTB_BUILD_TESTS=OFF -DTB_BUILD_BENCH=OFF -DTB_WERROR=OFF)
  case $flavour in
    release) args+=(-DCMAKE_BUILD_TYPE=Release) ;;
    minsizerel) args+=(-DCMAKE_BUILD_TYPE=MinSizeRel) ;;
    relwithdebinfo) args+=(-DCMAKE_BUILD_TYPE=RelWithDebInfo) ;;
    debian)
      # CMake ignores CPPFLAGS; debhelper adds them to CFLAGS/CXXFLAGS, and so does this.
      eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --export=sh)"
      args+=(-DCMAKE_BUILD_TYPE=None -DCMAKE_C_FLAGS="$CFLAGS $CPPFLAGS"
             -DCMAKE_CXX_FLAGS="$CXXFLAGS $CPPFLAGS" -DCMAKE_EXE_LINKER_FLAGS="$LDFLAGS") ;;
    fedora)
      args+=(-DCMAKE_BUILD_TYPE=None -DCMAKE_C_FLAGS="$fedora_optflags"
             -DCMAKE_CXX_FLAGS="$fedora_optflags" -DCMAKE_EXE_LINKER_FLAGS="$fedora_ldflags") ;;
    *) echo "unknown flavour: $flavour" >&2; exit 2 ;;
  esac
  echo "== $flavour"
  start=$SECONDS
  cmake -S . -B "$dir" "${args[@]}" >/dev/null
  cmake --build "$dir" -j"$(nproc)" --target tb-agent >"$dir/build.log" 2>&1 ||
    { tail -50 "$dir/build.log"; echo "== $flavour: build FAILED" >&2; exit 1; }
  "$dir/src/tb-agent" --version
  "$dir/src/tb-agent" --check-config --config config/tb-agent.yaml
  echo "== $flavour: built in $((SECONDS - start)) s ($(grep -c 'warning:' "$dir/build.log") warnings)"
done
