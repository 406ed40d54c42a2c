#!/usr/bin/env bash
# Registry under abuse: N hosts renew workload certificates (SignWorkload, real node
# certificates from a real registry) while the registry is flooded with idle TCP/TLS
# connections, with open HTTP/2 streams and with an HTTP/2 rapid-reset burst; renewal success
# rate and latency with and without each abuse, side by side in one run. Prints markdown tables
# and writes them to bench/results/registry-abuse-<UTC time>.md. See BENCHMARKS.md ("Registry
# under abuse"). Never run by CI.
#
# Environment (defaults in brackets):
#   NODES [100]          hosts renewing over their own long-lived connection (127.1.x.y)
#   FRESH [10]           clients renewing over a new connection each time (127.2.0.x)
#   INTERVAL [1s]        time between two renewals of one client
#   PHASES ["baseline,idle,idle-wide,streams,reset,all,baseline"]
#   PHASE [20s]          measured time per phase (after WARMUP [3s] of attack; COOLDOWN [3s] after)
#   REGISTRY [target/release/mesh-registry]
#                        the registry binary: an older build here gives the "before" numbers
#   REGISTRY_CONFIG [""] extra `key = value` lines for registry.toml (e.g. "max_connections = 2000")
#   LOADGEN_ARGS [""]    more registry-abuse flags (see `registry-abuse --help`)
#   DATA_ROOT [$TMPDIR or /tmp], READY_TIMEOUT [60], BUILD [0] (1: cargo build --release first)
set -euo pipefail

NODES=${NODES:-100}
FRESH=${FRESH:-10}
INTERVAL=${INTERVAL:-1s}
PHASES=${PHASES:-baseline,idle,idle-wide,streams,reset,all,baseline}
PHASE=${PHASE:-20s}
WARMUP=${WARMUP:-3s}
COOLDOWN=${COOLDOWN:-3s}
REGISTRY_CONFIG=${REGISTRY_CONFIG:-}
LOADGEN_ARGS=${LOADGEN_ARGS:-}
DATA_ROOT=${DATA_ROOT:-${TMPDIR:-/tmp}}
READY_TIMEOUT=${READY_TIMEOUT:-60}
BUILD=${BUILD:-0}
REG_LISTEN=127.0.0.1:17730   # not run.sh's 17710 nor propagation.sh's 17720
REG_ADMIN=127.0.0.1:17731

die() { echo "bench/registry_abuse.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
BIN="$ROOT/target/release"
REGISTRY=${REGISTRY:-$BIN/mesh-registry}
RESULTS="$ROOT/bench/results"

mkdir -p "$DATA_ROOT"
TMP=$(mktemp -d "$DATA_ROOT/meshd-registry-abuse.XXXXXX")
REG_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$REG_PID" ]; then
    kill "$REG_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$REG_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$REG_PID" 2>/dev/null || true
    wait "$REG_PID" 2>/dev/null || true
  fi
  if [ "$rc" != 0 ] && [ -f "$TMP/registry.log" ]; then
    echo "--- tail of $TMP/registry.log" >&2
    tail -n 5 "$TMP/registry.log" >&2
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_build=$BUILD
for b in meshctl mesh-registry registry-abuse; do [ -x "$BIN/$b" ] || need_build=1; done
if [ "$need_build" = 1 ]; then
  log "building release binaries (niced; several minutes on 2 cores)"
  (cd "$ROOT" && nice -n 10 cargo build --release -p meshd -p mesh-registry -p mesh-bench) ||
    die "cargo build --release failed"
fi
[ -x "$REGISTRY" ] || die "$REGISTRY is not an executable"
command -v curl >/dev/null || die "curl is required"

# The idle-wide flood: up to max_connections (10,000) sockets held in the registry, and one
# socket per flood worker (500 addresses x 34) in registry-abuse.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 18000 ] || log "warning: ulimit -n is $(ulimit -n); the idle-wide flood needs ~18000"

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
for a in $REG_LISTEN $REG_ADMIN; do
  ! port_busy "${a%:*}" "${a#*:}" || die "$a is in use (a previous run still alive?)"
done

log "starting the registry ($REGISTRY) in $TMP"
"$REGISTRY" init --trust-domain mesh.test --data-dir "$TMP/registry" \
  --listen $REG_LISTEN --admin-listen $REG_ADMIN >"$TMP/registry-init.log" 2>&1 ||
  die "mesh-registry init failed: $(cat "$TMP/registry-init.log")"
[ -z "$REGISTRY_CONFIG" ] || printf '%s\n' "$REGISTRY_CONFIG" >>"$TMP/registry/registry.toml"
# warn: the registry logs every issued certificate at info (100/s here).
MESHD_LOG=warn \
  "$REGISTRY" run --config "$TMP/registry/registry.toml" >"$TMP/registry.log" 2>&1 &
REG_PID=$!
deadline=$((SECONDS + READY_TIMEOUT))
until curl -fsS -o /dev/null "http://$REG_ADMIN/ready" 2>/dev/null; do
  [ "$SECONDS" -lt $deadline ] || die "timed out waiting for the registry"
  kill -0 "$REG_PID" 2>/dev/null || die "the registry exited"
  sleep 0.2
done
"$BIN/meshctl" --credentials "$TMP/registry/admin" --registry "$REG_LISTEN" \
  token create --services api --uses "$NODES" >"$TMP/token" 2>"$TMP/meshctl.log" ||
  die "meshctl token create failed: $(cat "$TMP/meshctl.log")"

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "measuring: $NODES hosts, $FRESH fresh-connection clients, phases $PHASES ($PHASE each)"
# shellcheck disable=SC2086 # LOADGEN_ARGS is a list of flags
"$BIN/registry-abuse" --registry $REG_LISTEN --admin $REG_ADMIN --token-file "$TMP/token" \
  --registry-pid "$REG_PID" --clk-tck "$(getconf CLK_TCK)" --nodes "$NODES" --fresh "$FRESH" \
  --interval "$INTERVAL" --phases "$PHASES" --phase "$PHASE" --warmup "$WARMUP" \
  --cooldown "$COOLDOWN" $LOADGEN_ARGS >"$TMP/report.md" ||
  die "registry-abuse failed"
kill -0 "$REG_PID" 2>/dev/null || die "the registry died during the run"

mkdir -p "$RESULTS"
out="$RESULTS/registry-abuse-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# Registry under abuse, $started"
  echo
  echo "Registry: \`$REGISTRY\`$([ -n "$REGISTRY_CONFIG" ] && echo " with \`$REGISTRY_CONFIG\`")."
  echo "Command: NODES=$NODES FRESH=$FRESH INTERVAL=$INTERVAL PHASES=$PHASES PHASE=$PHASE WARMUP=$WARMUP COOLDOWN=$COOLDOWN bench/registry_abuse.sh $LOADGEN_ARGS"
  echo
  cat "$TMP/report.md"
} | tee "$out"
log "written to $out"
