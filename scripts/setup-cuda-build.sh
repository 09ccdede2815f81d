#!/usr/bin/env bash
# Makes `cargo build --features cuda` work offline, against Debian's LLVM 22 instead of the
# prebuilt LLVM that burn's CUDA backend would download (docs/distributed.md, "Building the
# CUDA backend"; ../shared/docs/burn-0.22-notes.md has how this was found):
#
#   cubecl-cuda depends on cubecl-llvm, whose build dependency tracel-llvm-bundler downloads
#   LLVM unless $XDG_DATA_HOME/tracel/tracel-llvm-23.1.0-4/.tracel-llvm-installed exists. This
#   script installs Debian's llvm-22-dev, creates that directory with the sentinel and a
#   bin/llvm-config wrapper around Debian's, which drops the Polly libraries Debian does not
#   ship as static archives and links z3 by name.
#
# No GPU or CUDA toolkit is needed to build: cudarc loads libcuda when the program runs.
# Idempotent; run it again after an LLVM upgrade (then `cargo clean -p cubecl-llvm`).
set -euo pipefail

LLVM_VERSION=22
BUNDLE="tracel-llvm-23.1.0-4"   # the version cubecl-llvm 0.11 (burn 0.22.1) asks for
llvm_config="/usr/lib/llvm-$LLVM_VERSION/bin/llvm-config"

if [ ! -x "$llvm_config" ] || ! dpkg -s libzstd-dev >/dev/null 2>&1 || ! command -v g++ >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    "llvm-$LLVM_VERSION-dev" libzstd-dev g++ >/dev/null
fi

dir="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/$BUNDLE"
mkdir -p "$dir/bin"
cat > "$dir/bin/llvm-config" <<EOF
#!/bin/sh
# Written by kiln's scripts/setup-cuda-build.sh: Debian's llvm-config, minus Polly, with z3
# linked by name rather than by the absolute path of its shared library.
"$llvm_config" "\$@" | sed -e 's#[^ ]*/libz3\.so[^ ]*#-lz3#g' -e 's#-lPollyISL##g' -e 's#-lPolly##g'
EOF
chmod +x "$dir/bin/llvm-config"
touch "$dir/.tracel-llvm-installed"
echo "LLVM for the CUDA build: $dir (wrapping $llvm_config, $("$llvm_config" --version))"
