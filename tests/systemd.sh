#!/usr/bin/env bash
# systemd tests (root, Debian 12): a Debian 12 root made with debootstrap (minbase + systemd),
# both .debs installed in it with apt, booted with systemd-nspawn. Inside, a test unit
# (tests/systemd/systest.sh) exercises the real units and writes its results; the container
# then powers off and this script reads them.
# Needs the packages built by scripts/build-packages.sh (tests/packages.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$(pwd)

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends systemd-container debootstrap >/dev/null
[ -e target/packages/vmwatch-node_0.1.0-1_amd64.deb ] || bash scripts/build-packages.sh >/dev/null

base=/var/tmp/vmwatch-nspawn-base
if [ ! -e "$base/.complete" ]; then
  rm -rf "$base"
  echo "systemd: debootstrap of a Debian 12 minbase root (once, cached in $base)"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,ca-certificates,logrotate,adduser,curl,procps,libvirt0 \
    bookworm "$base" http://deb.debian.org/debian >/tmp/vmwatch-debootstrap.log 2>&1 \
    || { tail -20 /tmp/vmwatch-debootstrap.log; exit 1; }
  touch "$base/.complete"
fi
work=$(mktemp -d /var/tmp/vmwatch-nspawn-XXXXXX)
[ -n "${VMWATCH_KEEP_TEST_DIRS:-}" ] || trap 'rm -rf "$work"' EXIT
cp -a "$base/." "$work/"
cp target/packages/vmwatch-node_0.1.0-1_amd64.deb target/packages/vmwatch-master_0.1.0-1_amd64.deb "$work/root/"
cp "$root_dir/tests/systemd/systest.sh" "$work/usr/local/bin/vmwatch-systest"
chmod 755 "$work/usr/local/bin/vmwatch-systest"
cat >"$work/etc/systemd/system/vmwatch-systest.service" <<'UNIT'
[Unit]
Description=vmwatch system test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/bin/vmwatch-systest
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=file:/systest.log
StandardError=inherit
UNIT
mkdir -p "$work/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/vmwatch-systest.service "$work/etc/systemd/system/multi-user.target.wants/vmwatch-systest.service"

nspawn=(systemd-nspawn -q -D "$work" --register=no --keep-unit)
cp /etc/resolv.conf "$work/etc/resolv.conf"
echo "systemd: installing both .debs with apt inside the root"
"${nspawn[@]}" --pipe -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /root/vmwatch-node_0.1.0-1_amd64.deb /root/vmwatch-master_0.1.0-1_amd64.deb >/dev/null' \
  || { echo "FAILED: apt-get install of the .debs inside the root"; exit 1; }

echo "systemd: booting the root with systemd-nspawn --boot"
start=$(date +%s)
timeout 240 "${nspawn[@]}" --boot >"$work.boot.log" 2>&1 || true
echo "systemd: container ran $(( $(date +%s) - start )) s"
if [ ! -s "$work/systest.log" ]; then
  echo "FAILED: the system test did not run; boot log:"; tail -40 "$work.boot.log"; exit 1
fi
cat "$work/systest.log"
rm -f "$work.boot.log"
grep -q '^systemd: [0-9]* passed, 0 failed$' "$work/systest.log"
