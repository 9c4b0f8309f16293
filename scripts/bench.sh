#!/usr/bin/env bash
# The comparison bench (issue 13, docs/performance.md): builds tb-agent in Release, installs what
# the bench alone needs (collectd-core to compare with, python3-matplotlib for the plots; CI
# installs neither), then runs bench/run.py. Prints a markdown table; writes
# bench-results/results.markdown, results.json and *.png.
#   scripts/bench.sh [--quick] [--runs N] [--only throughput,distance,footprint,booted,idle,ready,size,scaling]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
missing=()
dpkg-query -W -f='${Status}' collectd-core 2>/dev/null | grep -q "install ok installed" || missing+=(collectd-core)
dpkg-query -W -f='${Status}' python3-matplotlib 2>/dev/null | grep -q "install ok installed" || missing+=(python3-matplotlib)
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DTB_BUILD_TESTS=ON "${launcher[@]}" >/dev/null
cmake --build build-bench -j"$(nproc)" --target tb-agent tb-test-server tb-bench-drain tb-bench-coap-ceiling
exec /usr/bin/python3 bench/run.py --build build-bench --out bench-results "$@"
