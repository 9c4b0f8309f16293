#!/usr/bin/env bash
# Builds tb-agent and runs every test: the normal build (all labels), then an ASan+UBSan build
# (unit and integration tests). Usage: scripts/test.sh [extra ctest args, e.g. -L unit]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

jobs=$(nproc)
echo "== format check"
git ls-files '*.cpp' '*.hpp' '*.h' '*.c' | xargs -r clang-format --dry-run -Werror

echo "== build (RelWithDebInfo, -Werror)"
# Prefix /usr, as the packages have it: the package tests (label package) build them from here.
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTB_COAP_BACKEND=notls -DTB_WERROR=ON \
  -DCMAKE_INSTALL_PREFIX=/usr >/dev/null
cmake --build build -j"$jobs"
echo "== tests"
ctest --test-dir build --output-on-failure -j"$jobs" "$@"

echo "== build with a packager's flags (no -Werror)"
# Fedora's %optflags (LTO, _GLIBCXX_ASSERTIONS, fortify): the set furthest from the development
# build. scripts/build-matrix.sh with no argument also builds Release, MinSizeRel and Debian's.
scripts/build-matrix.sh fedora

echo "== build (ASan + UBSan)"
# The sanitizer build also covers the OpenSSL (DTLS-capable) libcoap backend.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DTB_SANITIZE=ON -DTB_BUILD_BENCH=OFF -DTB_WERROR=ON \
  -DTB_COAP_BACKEND=openssl >/dev/null
cmake --build build-asan -j"$jobs"
echo "== tests under ASan + UBSan"
# Left out: slow, systemd; hostfault (its LD_PRELOAD clock shim cannot come before the ASan
# runtime); netfault and fleet (minutes of wall time by design, and 100 sanitized agents do not
# fit two cores). The serverfault and soak suites run here too: the soak is the leak check.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs" -LE 'slow|systemd|hostfault|netfault|fleet' "$@"
