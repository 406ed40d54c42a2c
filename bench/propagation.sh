#!/usr/bin/env bash
# Policy propagation time: from `meshctl apply` acknowledged (the command returned) to the new
# revision enforced on every meshd, for N meshd processes on loopback (127.2.x.y), plus idle RSS
# and gossip CPU per meshd. Prints markdown tables and writes them to
# bench/results/propagation-<UTC time>.md. See BENCHMARKS.md ("Policy"). Never run by CI.
#
# Environment (defaults in brackets):
#   NODES ["10 100"]        cluster sizes, measured one after the other, each from scratch
#   ITERATIONS [20]         applies per cluster size
#   GAP [1]                 seconds between the end of one apply and the next (plus 0–0.5 s of
#                           jitter so applies do not line up with the gossip rounds)
#   GOSSIP_INTERVAL [1s]    meshd gossip.interval (1s: fewer packets for 100 processes on 2 CPUs)
#   IDLE_WINDOW [10]        seconds of idle CPU measurement per cluster size
#   PRELOAD [0]             1: apply authz-bench's 100 AuthorizationPolicies before measuring,
#                           so every node persists a 100-resource snapshot per revision
#   DATA_ROOT [$TMPDIR or /tmp]
#                           where the registry and node directories go (the filesystem meshd
#                           fsyncs policy.json on; /dev/shm takes the disk out)
#   READY_TIMEOUT [180]     seconds to wait for the registry, for all nodes to be ready and for
#                           each revision to reach every node
#   BUILD [0]               1: run cargo build --release even if the binaries exist
set -euo pipefail
export LC_ALL=C   # $EPOCHREALTIME and printf with a '.' decimal separator

NODES=${NODES:-10 100}
ITERATIONS=${ITERATIONS:-20}
GAP=${GAP:-1}
GOSSIP_INTERVAL=${GOSSIP_INTERVAL:-1s}
IDLE_WINDOW=${IDLE_WINDOW:-10}
PRELOAD=${PRELOAD:-0}
DATA_ROOT=${DATA_ROOT:-${TMPDIR:-/tmp}}
READY_TIMEOUT=${READY_TIMEOUT:-180}
BUILD=${BUILD:-0}
REG_LISTEN=127.0.0.1:17720   # not run.sh's 17710 nor the getting-started 7700
REG_ADMIN=127.0.0.1:17721
APP_ADDR=127.0.0.1:18098     # service api's app address; nothing needs to listen there

die() { echo "bench/propagation.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
BIN="$ROOT/target/release"
RESULTS="$ROOT/bench/results"
HZ=$(getconf CLK_TCK)

# --- cleanup -------------------------------------------------------------------------------
mkdir -p "$DATA_ROOT"
TMP=$(mktemp -d "$DATA_ROOT/meshd-propagation.XXXXXX")
OUR_PIDS=()
stop_all() { # SIGTERM everything we started, wait up to 5 s, then SIGKILL
  local p
  for p in "${OUR_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${OUR_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  OUR_PIDS=()
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [ "$rc" != 0 ]; then
    for f in "$TMP"/*/registry.log "$TMP"/*/node-001/meshd.log; do
      [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 5 "$f" >&2; }
    done
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- binaries ------------------------------------------------------------------------------
need_build=$BUILD
for b in meshd meshctl mesh-registry propagation-report authz-bench; do [ -x "$BIN/$b" ] || need_build=1; done
if [ "$need_build" = 1 ]; then
  log "building release binaries (several minutes on 2 cores)"
  (cd "$ROOT" && cargo build --release -p meshd -p mesh-registry -p mesh-bench) ||
    die "cargo build --release failed"
fi
command -v curl >/dev/null || die "curl is required"

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
deadline_passed() { [ "$SECONDS" -ge "$1" ]; }
node_ip() { echo "127.2.$((($1 - 1) / 200)).$((($1 - 1) % 200 + 1))"; }
cpu_ticks() { # utime+stime of all threads of the given pids
  local sum=0 p
  for p in "$@"; do
    sum=$((sum + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo $sum
}

# --- one cluster size ----------------------------------------------------------------------
SUMMARY="$TMP/summary.md"
IDLE="$TMP/idle.md"
WORK="$TMP/work.md"
: >"$SUMMARY"
: >"$IDLE"
: >"$WORK"

run_size() { # N
  local n=$1 dir="$TMP/n$1" i ip seeds=() pending deadline
  local meshctl=("$BIN/meshctl" --credentials "$dir/registry/admin" --registry "$REG_LISTEN")
  mkdir -p "$dir"
  for a in $REG_LISTEN $REG_ADMIN; do ! port_busy "${a%:*}" "${a#*:}" || die "$a is in use (a previous run still alive?)"; done
  for i in 1 "$n"; do
    ! port_busy "$(node_ip "$i")" 15000 || die "$(node_ip "$i"):15000 is in use (a previous run still alive?)"
  done

  log "N=$n: starting the registry in $dir"
  "$BIN/mesh-registry" init --trust-domain mesh.test --data-dir "$dir/registry" \
    --listen $REG_LISTEN --admin-listen $REG_ADMIN >"$dir/registry-init.log" 2>&1 ||
    die "mesh-registry init failed: $(cat "$dir/registry-init.log")"
  # Every meshd reaches the registry from 127.0.0.1 (one source address for N hosts): lift the
  # per-source connection limit (default 32) above N.
  echo "max_connections_per_ip = $((n + 100))" >>"$dir/registry/registry.toml"
  "$BIN/mesh-registry" run --config "$dir/registry/registry.toml" >"$dir/registry.log" 2>&1 &
  local reg_pid=$!
  OUR_PIDS+=("$reg_pid")
  deadline=$((SECONDS + READY_TIMEOUT))
  until curl -fsS -o /dev/null "http://$REG_ADMIN/ready" 2>/dev/null; do
    ! deadline_passed $deadline || die "timed out waiting for the registry"
    sleep 0.2
  done
  "${meshctl[@]}" token create --services api --uses 0 >"$dir/token" 2>"$dir/meshctl.log" ||
    die "meshctl token create failed: $(cat "$dir/meshctl.log")"

  if [ "$PRELOAD" = 1 ]; then
    "$BIN/authz-bench" --print-policies >"$dir/preload.toml"
    "${meshctl[@]}" apply -f "$dir/preload.toml" >>"$dir/meshctl.log" 2>&1 ||
      die "preloading the 100 policies failed: $(tail -n 5 "$dir/meshctl.log")"
  fi

  log "N=$n: starting $n meshd (gossip every $GOSSIP_INTERVAL, TOKIO_WORKER_THREADS=1)"
  for i in 1 2 3; do [ "$i" -le "$n" ] && seeds+=("\"$(node_ip "$i"):17946\""); done
  local node_pids=()
  for i in $(seq "$n"); do
    local name node
    name=$(printf 'node-%03d' "$i")
    node="$dir/$name"
    ip=$(node_ip "$i")
    mkdir -p "$node/services.d"
    cp "$dir/token" "$node/token"
    cat >"$node/meshd.toml" <<EOF
node_name = "$name"
data_dir = "data"
services_dir = "services.d"
[registry]
address = "$REG_LISTEN"
join_token_file = "token"
[gossip]
bind = "$ip:17946"
seeds = [$(IFS=,; echo "${seeds[*]}")]
interval = "$GOSSIP_INTERVAL"
[inbound]
bind = "$ip:15008"
[admin]
bind = "$ip:15000"
[drain]
grace_period = "1s"
EOF
    printf 'name = "api"\naddress = "%s"\n' "$APP_ADDR" >"$node/services.d/api.toml"
    (cd "$node" && exec env TOKIO_WORKER_THREADS=1 MESHD_LOG="info,chitchat=warn" \
      "$BIN/meshd" run --config meshd.toml) >"$node/meshd.log" 2>&1 &
    OUR_PIDS+=($!)
    node_pids+=($!)
  done

  # Ready: every node joined, has its certificates and its first policy snapshot.
  deadline=$((SECONDS + READY_TIMEOUT))
  pending=$(seq "$n")
  while [ -n "$pending" ]; do
    local still=""
    for i in $pending; do
      curl -fsS -m 2 -o /dev/null "http://$(node_ip "$i"):15000/ready" 2>/dev/null || still+=" $i"
    done
    pending=$still
    [ -z "$pending" ] && break
    deadline_passed $deadline && die "timed out after ${READY_TIMEOUT}s: $(wc -w <<<"$pending") node(s) not ready (first: $(node_ip "${pending%% *}"))"
    sleep 0.5
  done
  local t_ready=$SECONDS
  log "N=$n: all $n nodes ready; waiting for gossip to converge"
  # Gossip is not on the policy path, but the idle numbers should be those of a converged mesh.
  local members=0
  deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    members=$(curl -fsS -m 2 "http://$(node_ip "$n"):15000/members" 2>/dev/null | grep -o '"gossip_addr"' | wc -l || true)
    [ "$members" -ge "$n" ] && break
    if deadline_passed $deadline; then log "N=$n: gossip did not converge ($members of $n members seen by the last node); going on"; break; fi
    sleep 1
  done
  log "N=$n: node-$n sees $members members after $((SECONDS - t_ready))s"

  # Idle: RSS and CPU of every meshd (and the registry) over IDLE_WINDOW seconds.
  sleep 3
  local c0 r0 w0 c1 r1 w1
  c0=$(cpu_ticks "${node_pids[@]}"); r0=$(cpu_ticks "$reg_pid"); w0=$EPOCHREALTIME
  sleep "$IDLE_WINDOW"
  c1=$(cpu_ticks "${node_pids[@]}"); r1=$(cpu_ticks "$reg_pid"); w1=$EPOCHREALTIME
  local rss
  rss=$(for p in "${node_pids[@]}"; do awk '/^VmRSS:/ {print $2}' "/proc/$p/status"; done | sort -n |
    awk '{a[NR] = $1; s += $1} END {printf "%.1f | %.1f | %.1f | %.0f", a[int((NR + 1) / 2)] / 1024, a[NR] / 1024, s / NR / 1024, s / 1024}')
  awk -v n="$n" -v dc=$((c1 - c0)) -v dr=$((r1 - r0)) -v hz="$HZ" -v w0="$w0" -v w1="$w1" -v rss="$rss" -v m="$members" 'BEGIN {
      w = w1 - w0
      printf "| %d | %d | %s | %.2f | %.1f | %.2f |\n", n, m, rss, dc / hz / w * 100, dc / hz / w / n * 1000, dr / hz / w * 100
    }' >>"$IDLE"

  log "N=$n: $ITERATIONS applies"
  local k pol out rev t0 t1 lc0 lr0 lw0
  : >"$dir/applies.tsv"
  lc0=$(cpu_ticks "${node_pids[@]}"); lr0=$(cpu_ticks "$reg_pid"); lw0=$EPOCHREALTIME
  for k in $(seq "$ITERATIONS"); do
    pol="$dir/policy-$k.toml"
    cat >"$pol" <<EOF
[[resource]]
kind = "AuthorizationPolicy"
name = "bench-propagation"
[resource.selector]
service = "api"
[[resource.rules]]
from = [{ principals = ["spiffe://mesh.test/ns/default/svc/client-$k"] }]
EOF
    t0=$EPOCHREALTIME
    out=$("${meshctl[@]}" apply -f "$pol" 2>>"$dir/meshctl.log") || die "meshctl apply failed: $(tail -n 5 "$dir/meshctl.log")"
    t1=$EPOCHREALTIME
    rev=$(sed -n 's/.*(revision \([0-9]*\)).*/\1/p' <<<"$out" | head -n1)
    [ -n "$rev" ] || die "no revision in the output of meshctl apply: $out"
    printf '%s\t%s\t%s\t%s\n' "$k" "$rev" "$t0" "$t1" >>"$dir/applies.tsv"
    # Look only after the gap, so the polling does not compete with the propagation for CPU.
    sleep "$(awk -v g="$GAP" -v k="$k" 'BEGIN {f = k * 0.618034; printf "%.3f", g + (f - int(f)) * 0.5}')"
    deadline=$((SECONDS + READY_TIMEOUT))
    until [ "$("$BIN/propagation-report" --count-applied "$rev" "$dir"/node-*/meshd.log)" -ge "$n" ]; do
      deadline_passed $deadline && die "revision $rev did not reach all $n nodes within ${READY_TIMEOUT}s"
      sleep 0.5
    done
  done
  # CPU the applies cost: the loop's CPU minus what the same processes use idle in that time.
  awk -v n="$n" -v k="$ITERATIONS" -v hz="$HZ" -v dc=$(($(cpu_ticks "${node_pids[@]}") - lc0)) \
    -v dr=$(($(cpu_ticks "$reg_pid") - lr0)) -v w="$(awk -v a="$lw0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" \
    -v ic=$((c1 - c0)) -v ir=$((r1 - r0)) -v iw="$(awk -v a="$w0" -v b="$w1" 'BEGIN {print b - a}')" 'BEGIN {
      node = (dc / hz - ic / hz / iw * w) / k / n * 1000
      reg = (dr / hz - ir / hz / iw * w) / k * 1000
      printf "| %d | %.2f | %.1f | %.1f |\n", n, node, node * n, reg
    }' >>"$WORK"

  {
    echo "$n"
    "$BIN/propagation-report" --label "$n" --applies "$dir/applies.tsv" --registry-log "$dir/registry.log" \
      --raw "$dir/delays.tsv" "$dir"/node-*/meshd.log
  } >"$dir/report.md" || die "propagation-report failed: $(cat "$dir/report.md")"
  tail -n +2 "$dir/report.md" >>"$SUMMARY"
  cat "$dir/report.md" | tail -n +2 >&2
  mkdir -p "$RESULTS"
  cp "$dir/delays.tsv" "$RESULTS/propagation-$STAMP-n$n.tsv"
  stop_all
}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
for n in $NODES; do
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 2000 ]] || die "NODES entries must be 1..2000, got '$n'"
  run_size "$n"
done

# --- report ----------------------------------------------------------------------------------
OUT="$RESULTS/propagation-$STAMP.md"
{
  echo "# bench/propagation.sh — $STAMP"
  echo
  echo "git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)'), meshd binary built $(date -u -r "$BIN/meshd" +%FT%TZ); $(nproc) vCPU; kernel $(uname -r); $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)"
  echo "$ITERATIONS applies per size, $GAP s + jitter apart; gossip interval $GOSSIP_INTERVAL; TOKIO_WORKER_THREADS=1; data on $(df --output=fstype "$TMP" | tail -n1) ($DATA_ROOT); preload of 100 policies: $([ "$PRELOAD" = 1 ] && echo yes || echo no); wall time $((SECONDS / 60))m$((SECONDS % 60))s."
  echo
  echo "Delays in ms. ack = \`meshctl apply\` returned; enforced = the node logged \"policy revision applied\" for that revision (persisted, about to be published to its proxy); commit = the registry logged \"policy revision committed\" (durable, about to be pushed). Nearest-rank percentiles."
  echo
  echo "| nodes | what | p50 | p99 | max | min | samples |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  cat "$SUMMARY"
  echo
  echo "Idle, after gossip converged, over $IDLE_WINDOW s:"
  echo
  echo "| nodes | members seen | RSS per meshd, MB: median | max | mean | RSS all meshd, MB | CPU all meshd, % of one vCPU | CPU per meshd, ‰ of one vCPU | registry CPU, % |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  cat "$IDLE"
  echo
  echo "CPU per apply (the apply loop's CPU time minus the idle rate over the loop's wall time; clock ticks of 1/$HZ s, so rough):"
  echo
  echo "| nodes | per meshd, ms | all meshd, ms | registry, ms |"
  echo "| --- | --- | --- | --- |"
  cat "$WORK"
} >"$OUT"
cat "$OUT"
log "written to ${OUT#"$ROOT"/}"
