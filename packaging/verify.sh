#!/usr/bin/env bash
# Every packaging proof in one go: packaging/build.sh (build and lint the debs and rpms),
# packaging/test-deb.sh (install/upgrade/purge and the README walkthrough in a Debian root) and
# ansible/test.sh (ansible-lint, the roles applied to Debian roots). On success it records the
# hash of the packaging inputs in packaging/verified.sha256.
#
# With --if-changed (what .ci/run uses) it does nothing when the inputs hash to the recorded
# value: a first run compiles cargo-generate-rpm for about 7 minutes and every run does an LTO
# release build, too slow for every CI run, so the packaging proofs run when packaging changes.
# The inputs are what the packages are made of besides the Rust code: packaging/, ansible/ and
# the [package.metadata.deb] / [package.metadata.generate-rpm] sections of the crates' Cargo.toml.
# A change there without a local run of this script makes CI run it.
#
# Needs root (debootstrap, chroot, network namespaces) and network access to the Debian mirror
# and PyPI. Usage: packaging/verify.sh [--if-changed]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stamp=packaging/verified.sha256

# The [package.metadata.*] sections of a Cargo.toml (what cargo-deb and cargo-generate-rpm read),
# so a dependency bump does not count as a packaging change.
metadata_of() {
  awk '/^\[/ { on = ($0 ~ /^\[package\.metadata\./) } on' "$1"
}

inputs_hash() {
  {
    git ls-files -z packaging ansible | grep -zv "^$stamp\$" | sort -z | xargs -0 sha256sum
    for toml in meshd/Cargo.toml registry/Cargo.toml; do
      echo "$toml $(metadata_of "$toml" | sha256sum | cut -d' ' -f1)"
    done
  } | sha256sum | cut -d' ' -f1
}

want=$(inputs_hash)
if [ "${1:-}" = --if-changed ]; then
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "verify.sh: packaging inputs unchanged since the last full verification ($want); skipping"
    exit 0
  fi
  echo "verify.sh: packaging inputs changed (now $want, recorded $(cat "$stamp" 2>/dev/null || echo none)); verifying"
fi

start=$(date +%s)
packaging/build.sh
packaging/test-deb.sh
ansible/test.sh
echo "$want" >"$stamp"
echo "verify.sh: all packaging proofs passed in $(($(date +%s) - start)) s; recorded $want in $stamp"
