#!/usr/bin/env bash
# Fails if a release binary needs a newer glibc or libvirt than the README promises (issue 25):
# reads the highest GLIBC_ and LIBVIRT_ symbol versions with objdump.
# Usage: scripts/check-symbols.sh DIR   (the directory holding vmwatch-node and vmwatch-master)
set -euo pipefail
dir=${1:?usage: check-symbols.sh DIR}
max_glibc=2.28      # EL8
max_libvirt=7.0.0   # Debian 11; the oldest libvirt the README names
fail=0
highest() { objdump -T "$1" | grep -o "$2_[0-9][0-9.]*" | sed "s/^$2_//" | sort -uV | tail -1; }
newer() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" != "$2" ]; }
for bin in vmwatch-node vmwatch-master; do
  glibc=$(highest "$dir/$bin" GLIBC)
  libvirt=$(highest "$dir/$bin" LIBVIRT || true)
  echo "$bin: GLIBC_${glibc:-none} LIBVIRT_${libvirt:-none} ($(stat -c %s "$dir/$bin") bytes)"
  if [ -n "$glibc" ] && newer "$glibc" "$max_glibc"; then
    echo "check-symbols: $bin needs GLIBC_$glibc, newer than $max_glibc" >&2; fail=1
  fi
  if [ -n "$libvirt" ] && newer "$libvirt" "$max_libvirt"; then
    echo "check-symbols: $bin needs LIBVIRT_$libvirt, newer than $max_libvirt" >&2; fail=1
  fi
done
exit $fail
