#!/usr/bin/env bash
# Decode kernel A/B: this working tree against a base revision, side by side in one process (see
# decode_ab.cpp). Usage: ci/kernel_ab/decode_ab.sh BASE_REV [decode_ab args...], e.g.
#   ci/kernel_ab/decode_ab.sh 7109a33 avx2base,avx2,avx512_bf16 bf16 16 3 32 2
# With no decode_ab args it runs the batch 1 / 16, fp32 / bf16 matrix of `bench decode`.
# Also: valgrind --tool=callgrind --toggle-collect='gdn::avx2::fused_recurrent*' $OUT/decode_ab avx2 bf16 16 1 1 1
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BASE="${1:?base revision}"; shift
OUT="${DECODE_AB_DIR:-/tmp/decode_ab}"
mkdir -p "$OUT/base"
git -C "$ROOT" archive "$BASE" kernels | tar -x -C "$OUT/base"
CXX="${CXX:-g++}"
CF="-std=c++17 -O3 -g -fno-math-errno -fopenmp-simd"
A2="-mavx2 -mfma -mf16c"
A5="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mprefer-vector-width=512"
build() {  # name flags kernel-dir
  $CXX $CF $2 -DGDN_ISA=$1 -I"$3" -c "$3/gdn/fused_recurrent.cpp" -o "$OUT/fr_$1.o"
}
build avx2 "$A2" "$ROOT/kernels" & build avx2base "$A2" "$OUT/base/kernels" &
build avx512 "$A5" "$ROOT/kernels" & build avx512base "$A5" "$OUT/base/kernels" & wait
build avx512_bf16 "$A5 -mavx512bf16" "$ROOT/kernels" & build avx512_bf16base "$A5 -mavx512bf16" "$OUT/base/kernels" &
$CXX $CF $A2 -DGDN_ISA=avx2 -I"$ROOT/kernels" -c "$ROOT/kernels/common/stream_scale.cpp" -o "$OUT/ss_avx2.o" & wait
$CXX $CF -I"$ROOT/kernels" "$ROOT/ci/kernel_ab/decode_ab.cpp" "$OUT"/fr_*.o "$OUT/ss_avx2.o" -o "$OUT/decode_ab" -lpthread
if [ $# -gt 0 ]; then
  exec "$OUT/decode_ab" "$@"
fi
V=avx2base,avx2,avx512_bf16base,avx512_bf16
"$OUT/decode_ab" $V f32 1 6 256 2
"$OUT/decode_ab" $V bf16 1 6 512 2
"$OUT/decode_ab" $V f32 16 3 16 2
"$OUT/decode_ab" $V bf16 16 3 32 2
