#!/usr/bin/env bash
# Verifies the systemd units offline with `systemd-analyze verify`, which must print nothing at
# all (its exit code is 0 even for unknown keys and bad values). There is no systemd as PID 1 on
# the build machines, and the units' /usr/bin binaries are not installed there, so each unit is
# checked as a copy whose ExecStart/ExecStartPre point at the freshly built binaries; every other
# line is the shipped one. Usage: packaging/check-units.sh [bin-dir]
# (default: $CARGO_TARGET_DIR/debug, or target/debug).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=${1:-${CARGO_TARGET_DIR:-$root/target}/debug}
command -v systemd-analyze >/dev/null || { echo "check-units: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for unit in "$root"/packaging/systemd/*.service; do
  name=$(basename "$unit")
  for b in meshd mesh-registry; do
    [ -x "$bin_dir/$b" ] || { echo "check-units: $bin_dir/$b missing (build first)" >&2; exit 1; }
  done
  sed -e "s|/usr/bin/meshd|$bin_dir/meshd|g" -e "s|/usr/bin/mesh-registry|$bin_dir/mesh-registry|g" \
    "$unit" >"$tmp/$name"
  out=$(systemd-analyze verify "$tmp/$name" 2>&1 || true)
  if [ -n "$out" ]; then
    echo "check-units: $name:" >&2
    echo "$out" >&2
    status=1
  else
    echo "check-units: $name ok"
  fi
done
# verify leaves a harmless marker behind; do not leave it on the build machine.
rm -f /run/systemd/systemd-units-load 2>/dev/null || true
exit "$status"
