#!/usr/bin/env bash
# Mixed fleets (issue 25, SPEC §14): the node from the .deb (its binary linked for glibc 2.28)
# installed with dpkg into Debian 11 (bullseye: glibc 2.31, libvirt 7.0, QEMU 5.2), Debian 12
# (bookworm: libvirt 9.0) and Debian 13 (trixie: libvirt 11, QEMU 10) roots made by debootstrap.
# Each root runs under systemd-nspawn as one hypervisor: that distribution's own libvirtd, with
# real TCG guests of its own QEMU, and the node, reporting to one master on this host over
# loopback. The guests are driven from the host with virsh through the container's socket:
# define, start, suspend, resume, destroy, undefine. Checked through the master's API: the node's
# libvirt version, each lifecycle event journaled as libvirt's event, the snapshot, stats
# (a guest that writes its disk), and the idle flags (a guest that does nothing is flagged
# idle.disk, the writer is not).
# Needs the packages built by scripts/build-packages.sh (tests/packages.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends systemd-container debootstrap curl jq python3 \
  libvirt-clients >/dev/null
[ -e target/packages/vmwatch-node_0.1.0-1_amd64.deb ] || bash scripts/build-packages.sh >/dev/null
[ -x target/release/vmwatch-master ] || cargo build --release -p vmwatch-master

pass=0
fail=0
check() { local what=$1; shift; if "$@"; then pass=$((pass + 1)); echo "ok: $what"; else fail=$((fail + 1)); echo "FAILED: $what"; fi; }
wait_for() { local n=$(( $1 * 5 )); shift; while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n - 1)); done; return 1; }

tmp=$(mktemp -d /var/tmp/vmwatch-mixed-XXXXXX)
master_pid=
container_pid=
stop_container() {
  # SIGTERM makes systemd-nspawn SIGKILL the container's PID 1: libvirtd, QEMU and the node go.
  [ -n "$container_pid" ] && kill "$container_pid" 2>/dev/null && wait "$container_pid" 2>/dev/null
  container_pid=
}
cleanup() {
  stop_container || true
  [ -n "$master_pid" ] && kill "$master_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${VMWATCH_KEEP_TEST_DIRS:-}" ] || rm -rf "$tmp"
}
trap cleanup EXIT

# One master on this host, per-node keys only; 1 s stats windows, idle after 3 quiet ones.
umask 077
cat >"$tmp/master.conf" <<CONF
listen=tcp://127.0.0.1:27515
http_listen=127.0.0.1:27516
secret=mixed-fleet-secret-0123456789
database=sqlite://$tmp/master.db
log_file=$tmp/master.log
allow_fleet_transport=no
idle_windows=3
CONF
target/release/vmwatch-master --config "$tmp/master.conf" &
master_pid=$!
wait_for 20 curl -fs http://127.0.0.1:27516/healthz >/dev/null || { echo "master did not start"; cat "$tmp/master.log"; exit 1; }
api() { curl -fs "http://127.0.0.1:27516$1"; }
# node_reports NODE LIBVIRT: that node is up, its libvirt up and of version LIBVIRT*.
node_reports() {
  api /api/v1/nodes | jq -e --arg n "$1" --arg v "$2" \
    '.nodes[] | select(.node_id == $n and .up and .libvirt_up and (.libvirt_version | startswith($v)))' >/dev/null
}
# is UUID JQ-FILTER VALUE: the filter over that VM's row (one node reports it) gives VALUE.
is() { [ "$(api "/api/v1/vms/$1" | jq -r ".rows[0] | $2")" = "$3" ]; }
# journaled UUID TYPE EVENT DETAIL: the journal holds that entry for that VM.
journaled() {
  api "/api/v1/events?uuid=$1&type=$2" | jq -e --arg e "$3" --arg d "$4" \
    '[.events[] | select(.event == $e and .detail == $d)] | length > 0' >/dev/null
}
# all_of CMD...: every command (a string, evaluated) succeeds.
all_of() { local c; for c in "$@"; do eval "$c" || return 1; done; }

# The guests' 1 MiB raw images (../shared/libvirt-testing.md): one sits in SeaBIOS, one writes
# a sector a second through INT 13h.
python3 - "$tmp" <<'PY'
import sys
code = bytes.fromhex("fa31c08ed88ec08ed0bc007c88162a7cfbb80103b9020030f68a162a7cbb007ecd13b91200f4e2fdebe700")
busy = bytearray(1 << 20); busy[:len(code)] = code; busy[510:512] = b"\x55\xaa"
open(sys.argv[1] + "/writer.img", "wb").write(busy)
open(sys.argv[1] + "/idle.img", "wb").write(bytearray(1 << 20))
PY
guest_xml() { # NAME IMAGE
  cat <<XML
<domain type='qemu'><name>$1</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='/vmw/$2'/><target dev='vda' bus='virtio'/></disk>
<serial type='pty'/><memballoon model='none'/></devices></domain>
XML
}

# suite and the libvirt version its node reports.
# VMWATCH_MIXED_SUITES narrows the run, for example to "trixie".
for spec in "bullseye 7.0" "bookworm 9.0" "trixie 11."; do
  case " ${VMWATCH_MIXED_SUITES:-bullseye bookworm trixie} " in *" ${spec%% *} "*) ;; *) continue ;; esac
  set -- $spec
  suite=$1 want_libvirt=$2
  base=/var/tmp/vmwatch-$suite-base
  if [ ! -e "$base/.complete" ]; then
    rm -rf "$base"
    echo "mixed: debootstrap of a Debian $suite minbase root with libvirt0 and libzmq5 (once, cached in $base)"
    debootstrap --variant=minbase --include=libvirt0,libzmq5,ca-certificates \
      "$suite" "$base" http://deb.debian.org/debian >"$tmp/debootstrap-$suite.log" 2>&1 \
      || { tail -20 "$tmp/debootstrap-$suite.log"; exit 1; }
    touch "$base/.complete"
  fi
  if [ ! -e "$base/.libvirtd" ]; then
    echo "mixed: installing $suite's libvirtd and QEMU into $base (once)"
    cp /etc/resolv.conf "$base/etc/resolv.conf"
    systemd-nspawn -q -D "$base" --register=no --keep-unit --pipe -- sh -ec '
      apt-get update -qq
      # bookworm split the QEMU driver out of libvirt-daemon; bullseye has no such package.
      qemu_driver=$(apt-cache show libvirt-daemon-driver-qemu >/dev/null 2>&1 && echo libvirt-daemon-driver-qemu || true)
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libvirt-daemon $qemu_driver qemu-system-x86 >/dev/null
      getent passwd libvirt-qemu >/dev/null || useradd --system --user-group --no-create-home libvirt-qemu
      apt-get clean' >"$tmp/apt-$suite.log" 2>&1 || { tail -20 "$tmp/apt-$suite.log"; exit 1; }
    touch "$base/.libvirtd"
  fi
  root=$tmp/root-$suite
  cp -a "$base/." "$root/"
  cp target/packages/vmwatch-node_0.1.0-1_amd64.deb "$root/root/"
  nspawn=(systemd-nspawn -q -D "$root" --register=no --keep-unit)
  glibc=$("${nspawn[@]}" /lib/x86_64-linux-gnu/libc.so.6 2>/dev/null | head -1 | grep -o "version [0-9.]*[0-9]" | cut -d" " -f2 || true)
  check "$suite: the .deb installs with dpkg (its Depends met by $suite's libc6, libvirt0, libzmq5)" \
    "${nspawn[@]}" dpkg -i /root/vmwatch-node_0.1.0-1_amd64.deb

  # The container's libvirtd (../shared/libvirt-testing.md: no cgroups, no security driver,
  # QEMU's output to files), its socket under /vmw/sock, reachable from the host too.
  mkdir -p "$root/vmw/sock" "$root/etc/libvirt"
  cp "$tmp/writer.img" "$tmp/idle.img" "$root/vmw/"
  cat >"$root/etc/libvirt/libvirtd.conf" <<'CONF'
unix_sock_dir = "/vmw/sock"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/vmw/libvirtd.log"
CONF
  cat >"$root/etc/libvirt/qemu.conf" <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
CONF
  node_id=mixed-$suite
  {
    target/release/vmwatch-master --config "$tmp/master.conf" enroll "$node_id" | grep -v '^connect='
    echo "connect=tcp://127.0.0.1:27515"
    echo "libvirt_uri=qemu+unix:///system?socket=/vmw/sock/libvirt-sock"
    echo "heartbeat_interval=1"
    echo "stats_interval=1"
    echo "log_file=/var/log/vmwatch-node.log"
  } >"$root/etc/vmwatch/vmwatch-node.conf"
  chmod 0640 "$root/etc/vmwatch/vmwatch-node.conf"
  cat >"$root/vmw/hypervisor.sh" <<'SH'
#!/bin/sh
/usr/sbin/libvirtd --pid-file /vmw/libvirtd.pid &
n=0
while [ ! -S /vmw/sock/libvirt-sock ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
exec /usr/sbin/vmwatch-node --config /etc/vmwatch/vmwatch-node.conf
SH
  chmod 755 "$root/vmw/hypervisor.sh"
  "${nspawn[@]}" --as-pid2 /vmw/hypervisor.sh >"$tmp/container-$suite.out" 2>&1 &
  container_pid=$!
  virsh=(virsh -q -c "qemu+unix:///system?socket=$root/vmw/sock/libvirt-sock")
  wait_for 30 "${virsh[@]}" list --all >/dev/null 2>&1 || { echo "mixed: $suite's libvirtd did not answer"; tail -20 "$root/vmw/libvirtd.log" "$tmp/container-$suite.out"; exit 1; }
  hv=$("${virsh[@]}" version | sed -n 's/^Running hypervisor: //p')

  check "$suite (glibc $glibc, $hv): the node reports up, libvirt up, libvirt $want_libvirt*" \
    wait_for 30 node_reports "$node_id" "$want_libvirt"
  for g in writer idle; do
    guest_xml "$suite-$g" "$g.img" >"$tmp/$suite-$g.xml"
    "${virsh[@]}" define "$tmp/$suite-$g.xml" >/dev/null
    "${virsh[@]}" start "$suite-$g" >/dev/null
  done
  writer=$("${virsh[@]}" domuuid "$suite-writer")
  idle=$("${virsh[@]}" domuuid "$suite-idle")
  check "$suite: both guests running in the master's inventory, their starts journaled as libvirt's events" \
    wait_for 15 all_of "[ \"\$(api '/api/v1/vms?node=$node_id&state=running' | jq .total)\" = 2 ]" \
    "journaled $writer lifecycle started booted" "journaled $idle lifecycle started booted"
  "${virsh[@]}" suspend "$suite-idle" >/dev/null
  check "$suite: suspend journaled (suspended/paused), the row reads paused" \
    wait_for 10 all_of "journaled $idle lifecycle suspended paused" "is $idle .state paused"
  "${virsh[@]}" resume "$suite-idle" >/dev/null
  check "$suite: resume journaled (resumed/unpaused), the row reads running" \
    wait_for 10 all_of "journaled $idle lifecycle resumed unpaused" "is $idle .state running"
  check "$suite: stats arrive: the writer's disk writes counted, a sample on its row" \
    wait_for 20 all_of "is $writer '(.usage.disk.last_delta // 0) > 0' true" "is $writer '.usage.sample != null' true"
  check "$suite: idle flags follow: the quiet guest idle.disk, journaled once; the writer not" \
    wait_for 30 all_of "is $idle .usage.disk.idle true" "is $writer .usage.disk.idle false" \
    "[ \"\$(api '/api/v1/events?uuid=$idle&type=idle' | jq '[.events[] | select(.event == \"disk\")] | length')\" = 1 ]"
  "${virsh[@]}" destroy "$suite-writer" >/dev/null
  "${virsh[@]}" undefine "$suite-writer" >/dev/null
  check "$suite: destroy and undefine journaled (stopped/destroyed, undefined/removed)" \
    wait_for 10 all_of "journaled $writer lifecycle stopped destroyed" "journaled $writer lifecycle undefined removed"
  api "/api/v1/nodes" | jq -c --arg n "$node_id" '.nodes[] | select(.node_id == $n)' | sed "s/^/mixed: $suite: /" || true
  "${virsh[@]}" destroy "$suite-idle" >/dev/null 2>&1 || true
  stop_container || true
  grep -q "vmwatch-node started" "$root/var/log/vmwatch-node.log" || { tail -5 "$root/var/log/vmwatch-node.log" 2>/dev/null; cat "$tmp/container-$suite.out"; }
  [ -n "${VMWATCH_KEEP_TEST_DIRS:-}" ] || rm -rf "$root"
done
echo "mixed: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
