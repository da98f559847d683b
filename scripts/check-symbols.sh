#!/usr/bin/env bash
# Fails if a release binary needs a newer glibc or libvirt than the README promises (issue 25):
# reads the highest GLIBC_ and LIBVIRT_ symbol versions with objdump.
# Usage: scripts/check-symbols.sh NODE_DIR [MASTER_DIR]   (the directories holding vmwatch-node
# and vmwatch-master; MASTER_DIR defaults to NODE_DIR)
set -euo pipefail
node_dir=${1:?usage: check-symbols.sh NODE_DIR [MASTER_DIR]}
master_dir=${2:-$node_dir}
max_glibc=2.28      # EL8
max_libvirt=7.0.0   # Debian 11; the oldest libvirt the README names
fail=0
highest() { objdump -T "$1" | grep -o "$2_[0-9][0-9.]*" | sed "s/^$2_//" | sort -uV | tail -1; }
newer() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" != "$2" ]; }
for bin in vmwatch-node vmwatch-master; do
  dir=$node_dir
  [ "$bin" = vmwatch-master ] && dir=$master_dir
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
