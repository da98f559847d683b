#!/usr/bin/env bash
# Builds the .deb and .rpm packages of vmwatch-node and vmwatch-master into target/packages/.
# Usage: scripts/build-packages.sh [VERSION]   (VERSION overrides the package version, for
# upgrade tests). Installs cargo-deb and cargo-generate-rpm with cargo if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
version=${1:-}

command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm

# The packages carry binaries that start on glibc 2.28 (EL8, Debian 11) and newer, linked by
# zig (scripts/zigbuild.sh), and checked: no GLIBC_ or LIBVIRT_ symbol newer than the README's.
bash scripts/zigbuild.sh
target=x86_64-unknown-linux-gnu
bash scripts/check-symbols.sh "target/$target/release-node" "target/$target/release"
out=target/packages
mkdir -p "$out"
# With VERSION, both tools are told it; without, they take Cargo.toml's.
deb_version=() rpm_version=()
if [ -n "$version" ]; then
  deb_version=(--deb-version "$version")
  rpm_version=(-s "version = \"$version\"")
fi
for pkg in vmwatch-node vmwatch-master; do
  # The node ships from its own profile (Cargo.toml's release-node), the master from release.
  profile=release
  [ "$pkg" = vmwatch-node ] && profile=release-node
  cargo deb --no-build --target "$target" --profile "$profile" -p "$pkg" "${deb_version[@]}" -o "$out/"
  cargo generate-rpm --target "$target" --profile "$profile" -p "$pkg" -o "$out/" "${rpm_version[@]}"
done
ls -1 "$out"
