#!/usr/bin/env bash
# Builds the fuzz build (clang, libFuzzer, ASan+UBSan; tests/fuzz) and runs every fuzz target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# First each target replays its seed corpus and its regressions (ctest -L fuzz), then each is
# fuzzed for SECONDS_PER_TARGET (default 15, what CI runs; 0 = replay only). New interesting
# inputs go to build-fuzz/corpus/<target>/, never into the tree; a crash stops the run and
# leaves its input in build-fuzz/artifacts/<target>/ (docs/testing.md says what to do with it).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-15}
shift || true
build=${TB_FUZZ_BUILD_DIR:-build-fuzz}
jobs=$(nproc)

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

echo "== fuzz build (clang, libFuzzer, ASan + UBSan) in $build"
start=$SECONDS
# -O1 and line tables only, as OSS-Fuzz builds: faster to compile, still fast to run. No NDEBUG:
# assertions (ours and nlohmann's JSON_ASSERT) stay on.
CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Fuzz \
  -DCMAKE_C_FLAGS_FUZZ="-O1 -gline-tables-only" -DCMAKE_CXX_FLAGS_FUZZ="-O1 -gline-tables-only" \
  -DTB_FUZZ=ON -DTB_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$jobs" --target fuzz_targets
echo "== fuzz build took $((SECONDS - start)) s"

# Every target (or the ones asked for): tests/fuzz/CMakeLists.txt lists them.
if (($# == 0)); then
  set -- $(sed -n 's/^tb_fuzz_target(\([a-z0-9_]*\) .*/\1/p' tests/fuzz/CMakeLists.txt)
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp}

# A failing replay (a regression not fixed yet) does not stop the fuzzing: both are reported.
failed=()
echo "== replay of seed corpora and regressions"
regex=$(printf '|fuzz_%s' "$@")
ctest --test-dir "$build" --output-on-failure -L fuzz -R "^(${regex:1})\$" || failed+=(replay)

((seconds > 0)) || set --
for target in "$@"; do
  echo "== fuzzing $target for $seconds s"
  corpus=$build/corpus/$target
  artifacts=$build/artifacts/$target
  mkdir -p "$corpus" "$artifacts"
  # A fixed seed (TB_FUZZ_SEED, default 1) makes a run repeatable: a CI failure can be replayed
  # exactly; set TB_FUZZ_SEED=0 for a fresh random seed when fuzzing longer by hand.
  args=(-seed="${TB_FUZZ_SEED:-1}" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=8192
        -print_final_stats=1 -artifact_prefix="$artifacts/")
  [[ -f tests/fuzz/$target.dict ]] && args+=(-dict="tests/fuzz/$target.dict")
  seeds=()
  for dir in tests/fuzz/corpus/$target tests/fuzz/regressions/$target; do
    [[ -d $dir ]] && seeds+=("$dir")
  done
  # The first directory collects new inputs; the seed directories in the tree are only read.
  if ! "$build/tests/fuzz/fuzz_$target" "${args[@]}" "$corpus" "${seeds[@]}" \
      >"$build/fuzz-$target.log" 2>&1; then
    grep -E -A12 '^==[0-9]+==ERROR|^SUMMARY|runtime error|fuzz check failed|what\(\)' \
      "$build/fuzz-$target.log" | head -n 40
    echo "FAILED: fuzz_$target found a problem; its input is in $artifacts/" \
      "(whole log: $build/fuzz-$target.log)" >&2
    failed+=("$target")
    continue
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb|new_units_added)' \
    "$build/fuzz-$target.log" | tr '\n' ' '
  echo
done
if ((${#failed[@]})); then
  echo "== problems in: ${failed[*]}" >&2
  exit 1
fi
echo "== fuzzing done"
