#!/bin/sh
# Runs inside the booted test container (see tests/systemd.sh) as a oneshot unit.
pass=0
fail=0
check() { what=$1; shift; if "$@"; then pass=$((pass + 1)); echo "ok: $what"; else fail=$((fail + 1)); echo "FAILED: $what"; fi; }
wait_for() { # wait_for SECONDS command...
  n=$(( $1 * 5 )); shift
  while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 0.2; n=$((n - 1)); done
  return 1
}
prop() { systemctl show -P "$2" "$1"; }
is() { [ "$(systemctl is-active "$1")" = "$2" ]; }

secret=systest-secret-0123456789
cat >/etc/vmwatch/vmwatch-master.conf <<CONF
disabled=no
listen=tcp://127.0.0.1:1515
secret=$secret
CONF
# The node is enrolled and its lines (connect, identity, keys) come from the master, as a
# panel gets them from the enrollment API.
{
  echo "heartbeat_interval=1"
  vmwatch-master --config /etc/vmwatch/vmwatch-master.conf enroll systest
} >/etc/vmwatch/vmwatch-node.conf
# Shorter watchdog than the shipped 30 s so the SIGSTOP test is quick.
mkdir -p /etc/systemd/system/vmwatch-node.service.d
printf '[Service]\nWatchdogSec=4\n' >/etc/systemd/system/vmwatch-node.service.d/test.conf
systemctl daemon-reload
systemctl restart vmwatch-master vmwatch-node

check "master unit active (Type=notify: READY=1 sent)" wait_for 20 is vmwatch-master active
is vmwatch-master active || { journalctl -u vmwatch-master --no-pager -n 30; tail -5 /var/log/vmwatch-master.log; }
check "node unit active although libvirt is absent" wait_for 20 is vmwatch-node active
check "master runs as vmwatch" sh -c '[ "$(ps -o user= -p "$(systemctl show -P MainPID vmwatch-master)")" = vmwatch ]'
check "master receives the node's heartbeats over loopback" wait_for 20 sh -c \
  'curl -fs http://127.0.0.1:1516/api/v1/nodes | grep -q "\"node_id\":\"systest\"" && curl -fs http://127.0.0.1:1516/metrics | grep -Eq "vmwatch_messages_accepted_total\{kind=\"heartbeat\"\} [1-9]"'
check "node shows libvirt down" sh -c 'curl -fs http://127.0.0.1:1516/api/v1/nodes | grep -q "\"libvirt_up\":false"'
check "logs in /var/log" sh -c 'grep -q "vmwatch-master started" /var/log/vmwatch-master.log && grep -q "vmwatch-node started" /var/log/vmwatch-node.log'

# Forced logrotate: the daemons get SIGHUP, keep running, and write on into the new files.
pid_before=$(prop vmwatch-master MainPID)
logrotate -f /etc/logrotate.d/vmwatch-master /etc/logrotate.d/vmwatch-node
check "rotated files exist" test -e /var/log/vmwatch-master.log.1 -a -e /var/log/vmwatch-node.log.1
check "master reopened its log after rotation" wait_for 10 grep -q "log file reopened" /var/log/vmwatch-master.log
check "node reopened its log after rotation" wait_for 10 grep -q "log file reopened" /var/log/vmwatch-node.log
check "master kept running through the HUP" sh -c "[ \"\$(systemctl show -P MainPID vmwatch-master)\" = $pid_before ]"

# Watchdog: a stopped (SIGSTOP) node is killed and restarted.
pid=$(prop vmwatch-node MainPID)
kill -STOP "$pid"
check "watchdog restarts a SIGSTOPped node" wait_for 30 sh -c "p=\$(systemctl show -P MainPID vmwatch-node); [ -n \"\$p\" ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $pid ]"
check "... and it becomes active again" wait_for 20 is vmwatch-node active

# Clean stop.
systemctl stop vmwatch-node
check "node stop is clean (inactive, result success)" sh -c '[ "$(systemctl is-active vmwatch-node)" = inactive ] && [ "$(systemctl show -P Result vmwatch-node)" = success ]'
check "node said bye on stop" wait_for 10 sh -c 'curl -fs "http://127.0.0.1:1516/api/v1/events?type=node" | grep -q "bye: shutdown"'

# disabled=yes: the master exits 0 and the unit ends inactive, not failed.
sed -i 's/^disabled=no/disabled=yes/' /etc/vmwatch/vmwatch-master.conf
systemctl restart vmwatch-master
check "disabled master ends inactive, not failed" wait_for 20 sh -c '[ "$(systemctl is-active vmwatch-master)" = inactive ] && [ "$(systemctl show -P Result vmwatch-master)" = success ]'

# A broken config: failed with status 78 and no restart loop.
sed -i 's/^disabled=yes/disabled=no/' /etc/vmwatch/vmwatch-master.conf
echo "bogus_key=1" >>/etc/vmwatch/vmwatch-master.conf
systemctl reset-failed vmwatch-master 2>/dev/null
systemctl start vmwatch-master
check "broken config: unit failed" wait_for 20 is vmwatch-master failed
check "... with exit status 78" sh -c '[ "$(systemctl show -P ExecMainStatus vmwatch-master)" = 78 ]'
sleep 5 # RestartSec=2: a restart loop would have restarted it by now
check "... and no restart loop" sh -c '[ "$(systemctl show -P NRestarts vmwatch-master)" = 0 ] && [ "$(systemctl is-active vmwatch-master)" = failed ]'
check "... the message names the key" sh -c 'grep -q "bogus_key" /var/log/vmwatch-master.log'

echo "systemd: $pass passed, $fail failed"
