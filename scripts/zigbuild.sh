#!/usr/bin/env bash
# Builds the release binaries the packages ship so that they start on glibc 2.28 (EL8) and
# newer (issue 25): cargo-zigbuild links with zig's glibc 2.28 stubs, and the system libvirt
# and libzmq stay dynamic, as before. zig comes from PyPI's `ziglang` in a venv of its own.
# Output: target/x86_64-unknown-linux-gnu/release/vmwatch-master and
# target/x86_64-unknown-linux-gnu/release-node/vmwatch-node (the node's profile, Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
venv=/opt/vmwatch-zig
if ! "$venv/bin/python3" -m ziglang version >/dev/null 2>&1; then
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "ziglang==0.14.1"
fi
command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild --version 0.20.1
# cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on PATH: the venv's python3 first.
PATH="$venv/bin:$PATH" cargo zigbuild --release --target x86_64-unknown-linux-gnu.2.28 \
  -p vmwatch-master
PATH="$venv/bin:$PATH" cargo zigbuild --profile release-node --target x86_64-unknown-linux-gnu.2.28 \
  -p vmwatch-node
