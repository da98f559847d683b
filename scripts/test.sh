#!/usr/bin/env bash
# Installs everything the tests need (Debian 12, as root), then runs every check and test:
# formatting, clippy, unit tests and the end-to-end tests against a private libvirtd with real
# QEMU guests. CI=1 makes any test that cannot find its environment fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export CI=1
# A one-off build gains nothing from incremental state (it was 7 GB of target/ here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The run needs about 7 GB of disk (target/, guests, databases); say so before a linker dies of
# a full disk with SIGBUS.
avail_kib=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${avail_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
  echo "warning: only $((avail_kib / 1024)) MiB free on $(df -P . | awk 'NR==2 {print $6}'); the tests need about 7 GB" >&2
fi
# Cases per property of the fuzzer (vmwatch-master/src/fuzz.rs).
export FUZZ_CASES="${FUZZ_CASES:-3000}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
# The end-to-end suites run the release binaries the packages ship (the writer-stall and
# containment figures of tests/tests/identity.rs are about them); unit tests run in debug.
cargo build --release -p vmwatch-master -p vmwatch-node
# A hung test fails the run, naming itself ("has been running for over 60 seconds"), instead
# of holding CI until its own limit: the suites take about 12 minutes, and 7 on PostgreSQL.
VMWATCH_BIN_DIR="$PWD/target/release" timeout -k 60 30m \
  cargo test --workspace -- --test-threads="${VMWATCH_TEST_THREADS:-3}"
# The same suites again with every master on PostgreSQL (a database each in the process's
# private cluster, tests/src/pg.rs), SPEC §12. The store's own tests (tests/tests/store.rs)
# already ran on both backends above.
VMWATCH_TEST_DATABASE=postgres VMWATCH_BIN_DIR="$PWD/target/release" timeout -k 60 20m cargo test -p vmwatch-tests \
  --test e2e --test truth --test bus --test browser -- --test-threads="${VMWATCH_TEST_THREADS:-3}"
# Packages: build .deb/.rpm, install, upgrade and purge them on this machine.
bash tests/packages.sh
# systemd: both .debs in a debootstrapped Debian 12 root booted with systemd-nspawn.
bash tests/systemd.sh
# Mixed fleets: the node's .deb on Debian 11, 12 and 13 (debootstrap roots, cached), each with its own
# libvirtd and real QEMU guests, reporting here.
bash tests/mixed.sh
