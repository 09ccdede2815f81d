#!/usr/bin/env bash
# Packs what scripts/device-check.sh runs on a lent NVIDIA GPU machine (the `device` tool),
# which has neither Rust nor a network: kiln and the data-parallel test binary built with
# `--features cuda`, stripped and xz-compressed into .device/ (git ignores it; name it in the
# tool's `carry`), the Vulkan loader for the wgpu benchmark, and the checkout path compiled
# into the test binary. Then, from the device tool:
#   run  command "bash scripts/device-check.sh"  carry [".device"]  timeout_s 360
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-cuda-build.sh
export CUDARC_CUDA_VERSION=12080   # silences cudarc's build-time probe for nvcc
tests=$(cargo test --release --features cuda --test distributed --no-run --message-format=json \
  | jq -r 'select(.reason == "compiler-artifact" and .target.name == "distributed" and .executable != null) | .executable')

mkdir -p .device/gl
for binary in target/release/kiln "$tests"; do
  name=$(basename "$binary" | sed 's/-[0-9a-f]*$//')
  strip -o ".device/$name" "$binary"
  xz -T0 -6 -f ".device/$name"
done
# The test binary finds the repository and kiln through paths fixed when it was built.
pwd > .device/checkout
# The Vulkan loader (the machine has NVIDIA's Vulkan driver but no loader).
if ! ls .device/gl/libvulkan1_*.deb >/dev/null 2>&1; then
  lists=$(mktemp -d)
  o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$lists"
  mkdir -p "$lists/partial"
  apt-get $o update -qq
  (cd .device/gl && apt-get $o download libvulkan1)
fi
du -ch .device/* | tail -1
