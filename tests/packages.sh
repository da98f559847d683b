#!/usr/bin/env bash
# Package tests (root, Debian 12): builds the .debs and .rpms, checks their file lists, verifies
# the systemd units and their hardening score, installs both .debs with apt on this machine,
# checks what the install created and how the daemons behave with the shipped configs, upgrades
# with an edited config, and purges. Leaves the machine as it found it (packages purged).
set -euo pipefail
cd "$(dirname "$0")/.."

# The highest `systemd-analyze security` exposure a unit may have (0 = best, 10 = worst).
MAX_EXPOSURE=2.0
pass=0
fail=0
check() { # check "what" command...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); echo "ok: $what"; else fail=$((fail + 1)); echo "FAILED: $what"; fi
}
contains_all() { # contains_all LISTFILE path...
  local list=$1; shift
  for p in "$@"; do grep -qxF "$p" "$list" || { echo "  missing $p"; return 1; }; done
}

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends systemd rpm logrotate >/dev/null
bash scripts/build-packages.sh >/dev/null
pkgs=target/packages
node_deb=$pkgs/vmwatch-node_0.1.0-1_amd64.deb
master_deb=$pkgs/vmwatch-master_0.1.0-1_amd64.deb
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

dpkg -c "$node_deb" | awk '{print $6}' | sed 's|^\./|/|' >"$tmp/node.deb.list"
dpkg -c "$master_deb" | awk '{print $6}' | sed 's|^\./|/|' >"$tmp/master.deb.list"
rpm -qlp $pkgs/vmwatch-node-0.1.0-1.x86_64.rpm >"$tmp/node.rpm.list" 2>/dev/null
rpm -qlp $pkgs/vmwatch-master-0.1.0-1.x86_64.rpm >"$tmp/master.rpm.list" 2>/dev/null
check "node .deb file list" contains_all "$tmp/node.deb.list" /usr/sbin/vmwatch-node /etc/vmwatch/vmwatch-node.conf \
  /lib/systemd/system/vmwatch-node.service /etc/logrotate.d/vmwatch-node
check "master .deb file list" contains_all "$tmp/master.deb.list" /usr/sbin/vmwatch-master /etc/vmwatch/vmwatch-master.conf \
  /lib/systemd/system/vmwatch-master.service /usr/lib/sysusers.d/vmwatch-master.conf \
  /usr/lib/tmpfiles.d/vmwatch-master.conf /etc/logrotate.d/vmwatch-master \
  /usr/share/vmwatch/vmwatch.rules.yml /usr/share/vmwatch/vmwatch-dashboard.json
check "node .rpm file list" contains_all "$tmp/node.rpm.list" /usr/sbin/vmwatch-node /etc/vmwatch/vmwatch-node.conf \
  /usr/lib/systemd/system/vmwatch-node.service /etc/logrotate.d/vmwatch-node
check "master .rpm file list" contains_all "$tmp/master.rpm.list" /usr/sbin/vmwatch-master /etc/vmwatch/vmwatch-master.conf \
  /usr/lib/systemd/system/vmwatch-master.service /usr/lib/sysusers.d/vmwatch-master.conf \
  /usr/share/vmwatch/vmwatch.rules.yml /usr/share/vmwatch/vmwatch-dashboard.json
check "rpm configs are noreplace" sh -c "rpm -qp --configfiles $pkgs/vmwatch-node-0.1.0-1.x86_64.rpm 2>/dev/null | grep -qx /etc/vmwatch/vmwatch-node.conf"
check "deb conffiles" sh -c "dpkg-deb -I $master_deb conffiles | grep -qx /etc/vmwatch/vmwatch-master.conf"
check "config mode 0640 in the package" sh -c "dpkg -c $node_deb | grep '^-rw-r----- .*etc/vmwatch/vmwatch-node.conf' >/dev/null"

apt-get purge -y -qq vmwatch-node vmwatch-master >/dev/null 2>&1 || true
apt-get install -y -qq "./$node_deb" "./$master_deb" >/dev/null
check "binaries installed" test -x /usr/sbin/vmwatch-node -a -x /usr/sbin/vmwatch-master
check "vmwatch system user" sh -c 'getent passwd vmwatch | grep -q ":/var/lib/vmwatch:"'
check "state directory" sh -c '[ "$(stat -c %U:%a /var/lib/vmwatch)" = vmwatch:750 ]'
check "master log file owned by vmwatch" sh -c '[ "$(stat -c %U /var/log/vmwatch-master.log)" = vmwatch ]'
check "master config root:vmwatch 0640" sh -c '[ "$(stat -c %U:%G:%a /etc/vmwatch/vmwatch-master.conf)" = root:vmwatch:640 ]'
check "units verify cleanly" sh -c '! systemd-analyze verify /lib/systemd/system/vmwatch-node.service /lib/systemd/system/vmwatch-master.service 2>&1 | grep .'
for unit in vmwatch-node vmwatch-master; do
  score=$(systemd-analyze security --offline=true /lib/systemd/system/$unit.service 2>/dev/null | sed -n 's/.*exposure level for .*: \([0-9.]*\).*/\1/p')
  echo "  systemd-analyze security $unit: $score"
  check "$unit exposure $score <= $MAX_EXPOSURE" awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s != "" && s <= m) }'
done
check "shipped master config: disabled, exits 0" runuser -u vmwatch -- /usr/sbin/vmwatch-master --config /etc/vmwatch/vmwatch-master.conf
set +e
/usr/sbin/vmwatch-node --config /etc/vmwatch/vmwatch-node.conf 2>"$tmp/node.err"
rc=$?
set -e
check "shipped node config (unset keys) exits 78" test "$rc" = 78
check "... with a message naming the key" grep -q "key \`connect\`" "$tmp/node.err"

# Upgrade keeps an edited config; purge removes it.
echo "# edited by the operator" >>/etc/vmwatch/vmwatch-node.conf
# The same binary as the package it upgrades (build-packages.sh: glibc 2.28, release-node).
cargo deb --no-build --target x86_64-unknown-linux-gnu --profile release-node -p vmwatch-node \
  --deb-version 0.1.1-1 -o "$pkgs/" >/dev/null
apt-get install -y -qq "./$pkgs/vmwatch-node_0.1.1-1_amd64.deb" >/dev/null
check "upgraded to 0.1.1" sh -c "dpkg-query -W -f='\${Version}' vmwatch-node | grep -qx 0.1.1-1"
check "upgrade kept the edited config" grep -q "edited by the operator" /etc/vmwatch/vmwatch-node.conf
apt-get purge -y -qq vmwatch-node vmwatch-master >/dev/null
check "purge removed the configs" test ! -e /etc/vmwatch/vmwatch-node.conf -a ! -e /etc/vmwatch/vmwatch-master.conf
check "purge removed the state directory" test ! -e /var/lib/vmwatch

echo "packages: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
