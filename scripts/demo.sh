#!/usr/bin/env bash
# Sets everything up (Debian 12, as root) and runs the product on a real local libvirtd:
# a private libvirtd with three tiny demo guests (idle, disk writer, PXE), a master and a node.
# Ctrl-C stops everything and removes the guests.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash scripts/install-deps.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release -p vmwatch-master -p vmwatch-node -p vmwatch-tests --bin vmwatch-master --bin vmwatch-node --bin vmwatch-testbed

demo="$root/.demo"
rm -rf "$demo"
mkdir -p "$demo"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "demo stopped"
}
trap cleanup EXIT INT TERM

echo "starting a private libvirtd with three demo guests (the first start probes QEMU: ~10 s)"
"$root/target/release/vmwatch-testbed" --name demo --dir "$demo" >"$demo/testbed.out" 2>"$demo/testbed.err" &
pids+=($!)
for _ in $(seq 1 1200); do
  grep -q '^READY' "$demo/testbed.out" 2>/dev/null && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then cat "$demo/testbed.err"; exit 1; fi
  sleep 0.1
done
uri=$(sed -n 's/^LIBVIRT_URI=//p' "$demo/testbed.out")
[ -n "$uri" ] || { echo "testbed did not start"; cat "$demo/testbed.err"; exit 1; }

secret=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
node_id=$(hostname -s | tr -c 'A-Za-z0-9._\n-' '-' | cut -c1-64)
[ -n "$node_id" ] || node_id=demo-node
# The configs hold secrets: the daemons refuse files other users can read.
umask 077
cat >"$demo/master.conf" <<CONF
listen=tcp://127.0.0.1:1515
secret=$secret
db_path=$demo/master.db
http_listen=127.0.0.1:1516
log_file=$demo/vmwatch-master.log
CONF
# Enrolling the node gives its lines (connect, node_id, its own secret and CURVE key, the
# master's key), as a panel gets them from POST /api/v1/nodes/{node_id}/enrollment.
"$root/target/release/vmwatch-master" --config "$demo/master.conf" enroll "$node_id" >"$demo/node.conf"
cat >>"$demo/node.conf" <<CONF
libvirt_uri=$uri
stats_interval=10
snapshot_interval=60
heartbeat_interval=5
log_file=$demo/vmwatch-node.log
CONF
chmod 0640 "$demo/master.conf" "$demo/node.conf"

"$root/target/release/vmwatch-master" --config "$demo/master.conf" &
pids+=($!)
"$root/target/release/vmwatch-node" --config "$demo/node.conf" &
pids+=($!)

ok=
for _ in $(seq 1 300); do
  if curl -fs http://127.0.0.1:1516/api/v1/nodes 2>/dev/null | grep -q "\"node_id\":\"$node_id\""; then ok=1; break; fi
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a demo process exited; see $demo/*.log"; exit 1; }; done
  sleep 0.1
done
[ -n "$ok" ] || { echo "the node did not reach the master within 30 s; see $demo/*.log"; exit 1; }
cat <<TXT

vmwatch demo running
  status page:  http://127.0.0.1:1516/
  API:          http://127.0.0.1:1516/api/v1/vms   /api/v1/nodes   /api/v1/events
  metrics:      http://127.0.0.1:1516/metrics
  logs:         $demo/vmwatch-master.log  $demo/vmwatch-node.log
  libvirt:      virsh -c '$uri' list --all
Press Ctrl-C to stop.
TXT
wait "${pids[1]}"
