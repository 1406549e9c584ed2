#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run) and as README.md's second command runs it:
#   1. install the Debian packages it needs;
#   2. build with -Werror and run every test (unit, end-to-end through the fake NVML, and as root
#      under a real one-node Slurm);
#   3. the same build and tests under AddressSanitizer + UndefinedBehaviorSanitizer;
#   4. each libFuzzer target for a few seconds from its seed corpus (clang).
# Exits non-zero on the first failure. Build trees: build/, build-asan/, build-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=$(nproc)

echo "== build (warnings as errors) and test"
cmake -S . -B build -G Ninja -DGPUSLOT_WERROR=ON >/dev/null
ninja -C build
# As root (CI) the real-Slurm tests (label slurm) must run, not skip: install-deps.sh installed Slurm.
if [[ $(id -u) -eq 0 ]]; then export GPUSLOT_REQUIRE_SLURM=1; fi
(cd build && ctest --output-on-failure -j"$jobs")

echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DGPUSLOT_WERROR=ON -DGPUSLOT_SANITIZE=ON >/dev/null
ninja -C build-asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j"$jobs" -L unit)
# Some end-to-end tests trace gpuslot with strace/gdb, under which LeakSanitizer cannot run;
# address and undefined-behaviour checks stay on.
(cd build-asan && ASAN_OPTIONS=detect_leaks=0 ctest --output-on-failure -j"$jobs" -L e2e)

echo "== fuzzers (libFuzzer, a few seconds each)"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DGPUSLOT_BUILD_FUZZERS=ON -DGPUSLOT_BUILD_BENCH=OFF \
  -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined" >/dev/null
ninja -C build-fuzz $(ninja -C build-fuzz -t targets all | grep -o '^fuzz_[a-z_]*' | sort -u)
(cd build-fuzz && ctest --output-on-failure -L fuzz)
