#!/usr/bin/env bash
# Installs every Debian package that building, running the demo and running the tests need.
# Safe to run again: apt-get skips what is already installed. Needs root (Debian 12).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: must run as root (it calls apt-get)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

# A fresh machine may carry qemu-utils 10.x from a backports source that is no longer listed;
# qemu-system-x86 7.2 conflicts with it, so pin qemu-utils to the version bookworm lists
# (see shared/libvirt-testing.md).
qemu_utils=$(apt-cache policy qemu-utils | awk '/^ +(\*\*\* )?1:7\.2/ {print ($1=="***") ? $2 : $1; exit}')
pin=()
if [ -n "$qemu_utils" ]; then
  pin=("qemu-utils=$qemu_utils")
fi

# chromium and a font: the status page's browser test (tests/tests/browser.rs) and
# vmwatch-bench-page drive it headless; Node.js 20+ and npm, which run the driver, come with
# the machine.
apt-get install -y -qq --no-install-recommends --allow-downgrades \
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 libvirt-dev \
  pkg-config libzmq3-dev iproute2 procps curl python3 python3-zmq python3-nacl python3-prometheus-client cmake g++ make sqlite3 \
  chromium fonts-dejavu-core "${pin[@]}" >/dev/null

# The event bus tests (tests/tests/bus.rs) start private RabbitMQ brokers, and run the Python
# consumer of docs/API.md with pika; the alert rules test (tests/tests/prometheus.rs) starts a
# private Prometheus; the store's tests start private PostgreSQL clusters (tests/src/pg.rs:
# initdb and pg_ctl as the postgres user). The packages' own services are not started on
# install (a policy-rc.d for this one call, unless the machine has its own): the tests need
# none, and an operator's machine should not grow a broker on 5672, a Prometheus on 9090 or a
# PostgreSQL on 5432 by surprise.
if ! dpkg -s rabbitmq-server python3-pika openssl prometheus postgresql >/dev/null 2>&1; then
  ours=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    ours=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$ours"
    chmod 755 "$ours"
    trap 'rm -f "$ours"' EXIT
  fi
  # openssl makes the TLS test's CA and broker certificate.
  apt-get install -y -qq --no-install-recommends rabbitmq-server python3-pika openssl prometheus postgresql >/dev/null
  if [ -n "$ours" ]; then
    rm -f "$ours"
    trap - EXIT
  fi
fi

# The OpenAPI test validates the document and the live responses with openapi-spec-validator
# and jsonschema (PyPI) in a venv of their own.
venv=/opt/vmwatch-test-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openapi_spec_validator, jsonschema" 2>/dev/null; then
  apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "openapi-spec-validator==0.7.1" "jsonschema>=4.18"
fi

# libvirtd looks up this user before it reads qemu.conf and dies without it.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system -g libvirt-qemu --no-create-home libvirt-qemu

echo "install-deps.sh: system packages ready"
