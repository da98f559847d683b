#!/usr/bin/env bash
# Mixed fleets (issue 25, SPEC §14): the node from the .deb (its binary linked for glibc 2.28)
# installed with dpkg into Debian 11 (bullseye: glibc 2.31, libvirt 7.0) and Debian 13 (trixie:
# libvirt 11) roots made by debootstrap, run there with systemd-nspawn against libvirt's
# in-process test driver, reporting to a master on this host over loopback: it starts, its
# snapshot, heartbeats and stats arrive, and the master shows that distribution's libvirt.
# (Debian 12 is covered by tests/systemd.sh and the end-to-end suites.)
# Needs the packages built by scripts/build-packages.sh (tests/packages.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends systemd-container debootstrap curl >/dev/null
[ -e target/packages/vmwatch-node_0.1.0-1_amd64.deb ] || bash scripts/build-packages.sh >/dev/null
[ -x target/release/vmwatch-master ] || cargo build --release -p vmwatch-master

pass=0
fail=0
check() { local what=$1; shift; if "$@"; then pass=$((pass + 1)); echo "ok: $what"; else fail=$((fail + 1)); echo "FAILED: $what"; fi; }
wait_for() { local n=$(( $1 * 5 )); shift; while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n - 1)); done; return 1; }

tmp=$(mktemp -d /var/tmp/vmwatch-mixed-XXXXXX)
master_pid=
node_pid=
cleanup() {
  [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null || true
  [ -n "$master_pid" ] && kill "$master_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${VMWATCH_KEEP_TEST_DIRS:-}" ] || rm -rf "$tmp"
}
trap cleanup EXIT

# One master on this host, per-node keys only.
umask 077
cat >"$tmp/master.conf" <<CONF
listen=tcp://127.0.0.1:27515
http_listen=127.0.0.1:27516
secret=mixed-fleet-secret-0123456789
db_path=$tmp/master.db
log_file=$tmp/master.log
allow_fleet_transport=no
CONF
target/release/vmwatch-master --config "$tmp/master.conf" &
master_pid=$!
wait_for 20 curl -fs http://127.0.0.1:27516/healthz >/dev/null || { echo "master did not start"; cat "$tmp/master.log"; exit 1; }
api() { curl -fs "http://127.0.0.1:27516$1"; }

# suite, the libvirt version it reports, whether its test driver has
# virConnectGetAllDomainStats (libvirt 7.0's has not; its QEMU driver has since 1.2.8).
for spec in "bullseye 7.0 no" "trixie 11. yes"; do
  set -- $spec
  suite=$1 want_libvirt=$2 driver_stats=$3
  base=/var/tmp/vmwatch-$suite-base
  if [ ! -e "$base/.complete" ]; then
    rm -rf "$base"
    echo "mixed: debootstrap of a Debian $suite minbase root with libvirt0 and libzmq5 (once, cached in $base)"
    debootstrap --variant=minbase --include=libvirt0,libzmq5,ca-certificates \
      "$suite" "$base" http://deb.debian.org/debian >"$tmp/debootstrap-$suite.log" 2>&1 \
      || { tail -20 "$tmp/debootstrap-$suite.log"; exit 1; }
    touch "$base/.complete"
  fi
  root=$tmp/root-$suite
  cp -a "$base/." "$root/"
  cp target/packages/vmwatch-node_0.1.0-1_amd64.deb "$root/root/"
  nspawn=(systemd-nspawn -q -D "$root" --register=no --keep-unit)
  glibc=$("${nspawn[@]}" /lib/x86_64-linux-gnu/libc.so.6 2>/dev/null | head -1 | grep -o "version [0-9.]*[0-9]" | cut -d" " -f2 || true)
  check "$suite: the .deb installs with dpkg (its Depends met by $suite's libc6, libvirt0, libzmq5)" \
    "${nspawn[@]}" dpkg -i /root/vmwatch-node_0.1.0-1_amd64.deb
  node_id=mixed-$suite
  {
    target/release/vmwatch-master --config "$tmp/master.conf" enroll "$node_id" | grep -v '^connect='
    echo "connect=tcp://127.0.0.1:27515"
    echo "libvirt_uri=test:///default"
    echo "heartbeat_interval=1"
    echo "stats_interval=1"
    echo "log_file=/var/log/vmwatch-node.log"
  } >"$root/etc/vmwatch/vmwatch-node.conf"
  chmod 0640 "$root/etc/vmwatch/vmwatch-node.conf"
  "${nspawn[@]}" /usr/sbin/vmwatch-node --config /etc/vmwatch/vmwatch-node.conf >"$tmp/node-$suite.out" 2>&1 &
  node_pid=$!
  check "$suite (glibc $glibc): the node starts and reports (up, libvirt $want_libvirt*)" wait_for 30 sh -c \
    "curl -fs http://127.0.0.1:27516/api/v1/nodes | grep -q '\"node_id\":\"$node_id\",\"up\":true' && curl -fs http://127.0.0.1:27516/api/v1/nodes | grep -o '\"node_id\":\"$node_id\"[^}]*' | grep -q '\"libvirt_version\":\"$want_libvirt'"
  check "$suite: its snapshot lists the test driver's domain" wait_for 10 sh -c \
    "curl -fs 'http://127.0.0.1:27516/api/v1/vms?node=$node_id' | grep -q '\"state\":\"running\"'"
  if [ "$driver_stats" = yes ]; then
    check "$suite: its stats arrive (the domain's row holds a sample)" wait_for 15 sh -c \
      "uuid=\$(curl -fs 'http://127.0.0.1:27516/api/v1/vms?node=$node_id' | grep -o '\"uuid\":\"[^\"]*' | head -1 | cut -d'\"' -f4); [ -n \"\$uuid\" ] && curl -fs \"http://127.0.0.1:27516/api/v1/vms/\$uuid\" | grep -q '\"sample\":{'"
  else
    check "$suite: the test driver has no stats call; the node says so and keeps reporting" wait_for 15 sh -c \
      "grep -q 'not supported by the connection driver: virConnectGetAllDomainStats' '$root/var/log/vmwatch-node.log' && curl -fs http://127.0.0.1:27516/api/v1/nodes | grep -q '\"node_id\":\"$node_id\",\"up\":true'"
  fi
  api "/api/v1/nodes" | grep -o "\"node_id\":\"$node_id\"[^}]*" | sed "s/^/mixed: $suite: /" || true
  kill "$node_pid" 2>/dev/null || true
  wait "$node_pid" 2>/dev/null || true
  node_pid=
  grep -q "vmwatch-node started" "$root/var/log/vmwatch-node.log" || { tail -5 "$root/var/log/vmwatch-node.log" 2>/dev/null; cat "$tmp/node-$suite.out"; }
done
echo "mixed: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
