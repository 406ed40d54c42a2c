#!/usr/bin/env bash
# Profile-guided optimisation of meshd: builds an instrumented meshd, runs the benchmark's
# workload through it (bench/run.sh HOLD=1 with MESHD_BIN: the L4 pair, the L7 pair and the
# HTTPS ingress gateway under wrk and mesh-bench), merges the profile with the toolchain's own llvm-profdata (rustup
# component llvm-tools: the same LLVM as rustc) into packaging/pgo/meshd.profdata (committed:
# packaging/build.sh builds the shipped meshd with it), and builds target/pgo/bin/meshd with it
# for bench/run.sh (MESHD_BIN). Rerun it when the request path changed much: functions changed
# since the profile was made are compiled as without it. See BENCHMARKS.md ("Profile-guided
# optimisation"). Never run by CI.
#
# Environment (defaults in brackets):
#   PGO_DIR [target/pgo]   raw profiles and the instrumented and optimised builds
#   LOAD [15s]             wrk run per pair and phase
set -euo pipefail

die() { echo "bench/pgo.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
cd "$ROOT"
PGO_DIR=${PGO_DIR:-$ROOT/target/pgo}
LOAD=${LOAD:-15s}
RAW="$PGO_DIR/raw"
PROFILE="$ROOT/packaging/pgo/meshd.profdata"

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  log "installing the llvm-tools component (llvm-profdata matching rustc's LLVM)"
  rustup component add llvm-tools >&2 || die "rustup component add llvm-tools failed"
fi
[ -x "$PROFDATA" ] || die "llvm-profdata not found at $PROFDATA"

log "building the instrumented meshd in $PGO_DIR/target (a full release build)"
rm -rf "$RAW" && mkdir -p "$RAW"
RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR="$PGO_DIR/target" \
  cargo build --release -q -p meshd || die "instrumented build failed"
# The other binaries the benchmark needs, normally built.
cargo build --release -q -p mesh-registry -p meshctl -p mesh-bench || die "release build failed"

log "running the workload through the instrumented meshd"
HOLD_LOG="$PGO_DIR/hold.log"
MESHD_BIN="$PGO_DIR/target/release/meshd" MESHD_VARIANTS="pinned http ingress" \
  TARGETS="meshd-pinned meshd-http meshd-ingress" HOLD=1 bench/run.sh >"$HOLD_LOG" 2>&1 &
HOLD_PID=$!
trap 'kill $HOLD_PID 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  grep -q "HOLD=1: everything is up" "$HOLD_LOG" && break
  kill -0 $HOLD_PID 2>/dev/null || break
  sleep 1
done
grep -q "HOLD=1: everything is up" "$HOLD_LOG" || die "the benchmark mesh did not come up: $(tail -5 "$HOLD_LOG")"
pids=$(sed -n 's/.*meshd-.*pids: //p' "$HOLD_LOG" | tr '\n' ' ')
# The L4 pair, the L7 pair and the HTTPS ingress gateway (bench/run.sh's ports and certificates).
peer_ca="${RUN:-${TMPDIR:-/tmp}/meshd-peers}/certs/ca.crt"
for target in http:18004 http:18006 https:18012; do
  scheme=${target%:*} port=${target#*:} tls=()
  [ "$scheme" = https ] && tls=(--tls-ca "$peer_ca" --tls-name edge.bench)
  wrk -t1 -c32 -d"$LOAD" "$scheme://127.0.0.1:$port/1k" >/dev/null || die "wrk on :$port failed"
  "$ROOT/target/release/mesh-bench" --addr "127.0.0.1:$port" --path /1k --rate 1000 \
    --connections 16 --duration 5s --expect-len 1024 "${tls[@]}" >/dev/null || die "mesh-bench on :$port failed"
done

log "stopping the instrumented nodes (the profile is written at exit)"
# shellcheck disable=SC2086
kill -TERM $pids
for _ in $(seq 60); do
  alive=0
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 1
done
[ "$alive" = 0 ] || die "meshd did not exit within 60 s of SIGTERM; no profile"
kill $HOLD_PID 2>/dev/null || true
wait $HOLD_PID 2>/dev/null || true
trap - EXIT
ls "$RAW"/*.profraw >/dev/null 2>&1 || die "no .profraw written in $RAW"

mkdir -p "$(dirname "$PROFILE")"
# Not --sparse (2 MB instead of 8): functions that never ran are then known to be cold, and
# compiled small and apart from the hot code, which keeps fewer code pages resident.
"$PROFDATA" merge -o "$PROFILE" "$RAW"/*.profraw || die "llvm-profdata merge failed"
log "merged $(ls "$RAW"/*.profraw | wc -l) raw profiles into $PROFILE"

log "building the profile-guided meshd in $PGO_DIR/use-target"
# A target dir of its own: RUSTFLAGS are part of every crate's fingerprint, so sharing
# target/release would rebuild the whole workspace on each switch.
RUSTFLAGS="-Cprofile-use=$PROFILE -Cllvm-args=-no-pgo-warn-mismatch" CARGO_TARGET_DIR="$PGO_DIR/use-target" \
  cargo build --release -q -p meshd || die "optimised build failed"
mkdir -p "$PGO_DIR/bin"
cp "$PGO_DIR/use-target/release/meshd" "$PGO_DIR/bin/meshd"
log "done: $PGO_DIR/bin/meshd (bench: MESHD_BIN=$PGO_DIR/bin/meshd bench/run.sh)"
