#!/usr/bin/env bash
# The CUDA and GPU checks of kiln on a lent NVIDIA GPU machine (the `device` tool), from the
# binaries scripts/device-pack.sh left in .device/. Logs go to $OUT (the tool brings them back):
#   tests.log  the CUDA tests of tests/distributed.rs (one GPU: training against the CPU, the
#              NCCL self-check, missing devices named; the two-GPU NCCL test when there are two)
#   bench.jsonl  `kiln bench train` on CUDA beside PyTorch on the same GPU (fp32, and TF32,
#                which cubecl's f32 matmuls may use), then on wgpu (Vulkan); bench.err their logs
# Each step has a time limit, cut to what is left of 300 s, so the whole script ends within
# about 5.5 minutes and a 15-minute lease keeps time for a second try.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kiln-device}
mkdir -p "$OUT"
say() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
deadline=$((SECONDS + 300))
# within LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds, and not past the deadline.
within() {
  local limit=$1 left=$((deadline - SECONDS))
  shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then say "skipped (no time left): $*"; return 124; fi
  timeout "$limit" "$@"
}

mkdir -p target/release /tmp/kiln-device-bin
xz -dc .device/kiln.xz > target/release/kiln
xz -dc .device/distributed.xz > /tmp/kiln-device-bin/distributed
chmod +x target/release/kiln /tmp/kiln-device-bin/distributed
# Paths compiled into the test binary (the repository, its kiln) name the packing checkout.
checkout=$(cat .device/checkout)
if [ "$checkout" != "$PWD" ] && [ ! -e "$checkout" ]; then
  mkdir -p "$(dirname "$checkout")" && ln -s "$PWD" "$checkout"
fi

# Run-time libraries. cudarc (built against CUDA 12.8) asks for libnccl.so, libnccl.so.12, ...
# but not the libnccl.so.2 of NVIDIA's wheels: link it under a name it asks for. libdevice
# (the math functions of kernels) comes from the CUDA toolkit.
mkdir -p /tmp/kiln-device-lib
nccl=$(find /usr /opt -name 'libnccl.so*' 2>/dev/null | head -1)
[ -n "$nccl" ] && ln -sf "$nccl" /tmp/kiln-device-lib/libnccl.so
export LD_LIBRARY_PATH="/tmp/kiln-device-lib:${LD_LIBRARY_PATH:-}"
libdevice=$(find /usr/local/cuda* /usr /opt -name libdevice.10.bc 2>/dev/null | head -1)
[ -n "$libdevice" ] && export CUDA_PATH="${libdevice%/nvvm/libdevice/libdevice.10.bc}"
for deb in .device/gl/*.deb; do dpkg -x "$deb" /; done
ldconfig
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] \
  && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
gpus=$(nvidia-smi -L | tee -a "$OUT/summary.txt" | wc -l)
say "nccl=$nccl CUDA_PATH=${CUDA_PATH:-unset} gpus=$gpus"

say "tests"
filters=(cuda:: devices_that_are_not_there_are_named)
ignored=()
[ "$gpus" -ge 2 ] && ignored=(--include-ignored)
within 150 /tmp/kiln-device-bin/distributed --test-threads 1 "${ignored[@]}" "${filters[@]}" \
  > "$OUT/tests.log" 2>&1
say "tests rc=$? $(grep -E '^test result' "$OUT/tests.log")"

say "benchmarks"
bench() { within "$@" 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"; }
for preset in bench-5m bench-32m; do
  bench 60 target/release/kiln bench train --preset "$preset" --device cuda --steps 20 --warmup 5
  bench 25 python3 benches/peers/torch_train.py --preset "$preset" --device cuda --steps 20 --warmup 5
  bench 25 python3 benches/peers/torch_train.py --preset "$preset" --device cuda --tf32 --steps 20 --warmup 5
done
bench 45 target/release/kiln bench train --preset bench-5m --device wgpu --steps 20 --warmup 5
say "done"
