#!/usr/bin/env bash
# Gossip convergence: how fast a new service endpoint and a node's death reach every node of an
# N-node mesh over meshd's gossip (chitchat with meshd's configuration), and what gossip costs
# each node in bandwidth. N chitchat nodes are simulated in one process over chitchat's
# in-memory transport (see the top of bench/loadgen/src/bin/gossip_convergence.rs). Prints a
# markdown report and writes it to bench/results/gossip-<UTC time>.md. About 30 minutes with
# the defaults on 2 vCPUs, 26 of them for 1,000 nodes; ALSO_REAL="10 100 200" adds ~3 (and a
# busy host can make its 200-node run collapse and wait out every timeout: ~10).
# Never run by CI.
#
# Clock: by default every run is a discrete-event simulation in virtual time (one thread,
# tokio's clock paused and moved from timer to timer), so every gossip round happens on time
# however much CPU N nodes need, and the results do not depend on the host. Simulating one
# second of 1,000 nodes takes about a minute on one core. REAL=1 runs everything in real time
# on a multi-thread runtime instead (the old mode: past ~200 nodes on 2 vCPUs the rounds run
# late and the numbers measure the host). Both are built from the same binary, built with
# tokio's test-util feature (needed to pause the clock).
#
# Environment (defaults in brackets):
#   NODES ["10 100 200 1000"]  cluster sizes, one process each, one after the other
#   REAL [0]                 1: every run in real time instead of virtual time
#   ALSO_REAL [""]           sizes to run again in real time, to compare (e.g. "10 100 200")
#   REPS [5]                 new-endpoint repetitions per size below LARGE, each from a
#                            different node
#   DEATH_REPS [5]           death repetitions per size below LARGE
#   WINDOW [10s]             steady-state bandwidth window, below LARGE
#   LARGE [500]              sizes from here on get LARGE_REPS, LARGE_DEATH_REPS, LARGE_WINDOW
#   LARGE_REPS [3]           (each simulated second of 1,000 nodes takes ~1 minute, and the
#   LARGE_DEATH_REPS [2]     run holds ~11 GB: each death is at least ~3 s,
#   LARGE_WINDOW [5s]        each new endpoint ~2 s with the pause before it)
#   MAX_WALL [50m]           stop a run (keeping what it measured) after this wall time
#   GOSSIP_INTERVAL [200ms]  meshd's default gossip.interval
#   CONVERGE_TIMEOUT [5m]    give up waiting for every node to see every other
#   MAX_RSS_MB [12500]       stop a run (keeping what it measured) past this RSS; the machine is
#                            shared, and a simulated node costs ~11 MB of RAM per 1,000 peers
#                            (8 of them its failure detector's 1,000-sample windows)
#   CEILING [1]              1: also run 240 nodes with 253-character node names: the longest
#                            digests at that size (with protocol V0 they no longer fit one sealed
#                            datagram, the size limit of meshd gossip; with V1 they do)
#   SEED [1]                 seed of the random choices
#   PROTOCOLS [v2]           gossip protocols, each over every size: v2 (what meshd ships),
#                            v1 (meshd before V2: every member in every digest), v0
#   BOOT_SPREAD [""]         nodes start within this (default: one gossip interval); 5s matches
#                            bench/gossip_real.sh at 100 nodes (it starts 20 meshd per second)
set -euo pipefail
export LC_ALL=C

NODES=${NODES:-10 100 200 1000}
REAL=${REAL:-0}
ALSO_REAL=${ALSO_REAL:-}
REPS=${REPS:-5}
DEATH_REPS=${DEATH_REPS:-5}
WINDOW=${WINDOW:-10s}
LARGE=${LARGE:-500}
LARGE_REPS=${LARGE_REPS:-3}
LARGE_DEATH_REPS=${LARGE_DEATH_REPS:-2}
LARGE_WINDOW=${LARGE_WINDOW:-5s}
MAX_WALL=${MAX_WALL:-50m}
GOSSIP_INTERVAL=${GOSSIP_INTERVAL:-200ms}
CONVERGE_TIMEOUT=${CONVERGE_TIMEOUT:-5m}
MAX_RSS_MB=${MAX_RSS_MB:-12500}
CEILING=${CEILING:-1}
PROTOCOLS=${PROTOCOLS:-v2}
SEED=${SEED:-1}
CEILING_NODES=240

die() { echo "bench/gossip.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
BIN="$ROOT/target/release/gossip-convergence"
RESULTS="$ROOT/bench/results"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshd-gossip.XXXXXX")
RUN_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$RUN_PID" ] && kill "$RUN_PID" 2>/dev/null && wait "$RUN_PID" 2>/dev/null
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for n in $NODES $ALSO_REAL; do
  [[ $n =~ ^[0-9]+$ && $n -ge 2 && $n -le 60000 ]] || die "NODES and ALSO_REAL entries must be 2..60000, got '$n'"
done
for p in $PROTOCOLS; do
  [[ $p =~ ^v[012]$ ]] || die "PROTOCOLS entries must be v0, v1 or v2, got '$p'"
done
[[ $REAL == 0 || $REAL == 1 ]] || die "REAL must be 0 or 1, got '$REAL'"
if [ "$REAL" = 1 ]; then CLOCK_ARGS=(); CLOCK=real; else CLOCK_ARGS=(--virtual-time); CLOCK=virtual; fi

# tokio's test-util feature pauses the clock for virtual time. Asked for here only, not in
# bench/loadgen/Cargo.toml: there it would be unified into every workspace build of meshd.
log "building gossip-convergence (release, tokio/test-util)"
(cd "$ROOT" && nice cargo build --release -p mesh-bench --bin gossip-convergence --features tokio/test-util) ||
  die "cargo build --release failed"

# A 253-character node name (the longest a NodeName may be): node-0001 + 244 characters.
long_suffix() {
  local l s=""
  for l in a b c; do s+=".$(printf "%62s" "" | tr ' ' "$l")"; done
  echo "$s.$(printf "%54s" "" | tr ' ' d)"
}

run_one() { # label N extra-args...
  local label=$1 n=$2 reps=$REPS death=$DEATH_REPS window=$WINDOW
  shift 2
  if [ "$n" -ge "$LARGE" ]; then
    reps=$LARGE_REPS death=$LARGE_DEATH_REPS window=$LARGE_WINDOW
  fi
  log "$label: $n nodes, gossip every $GOSSIP_INTERVAL, $reps + $death repetitions, window $window"
  # In the background so that Ctrl-C reaches it through cleanup.
  # No backtraces: a panic of a node's gossip task is counted from its first line.
  RUST_BACKTRACE=0 "$BIN" run --nodes "$n" --gossip-interval "$GOSSIP_INTERVAL" --reps "$reps" \
    --death-reps "$death" --window "$window" --converge-timeout "$CONVERGE_TIMEOUT" \
    --max-rss-mb "$MAX_RSS_MB" --max-wall "$MAX_WALL" --seed "$SEED" \
    ${BOOT_SPREAD:+--boot-spread "$BOOT_SPREAD"} --json "$TMP/$label.json" "$@" 2> >(tee "$TMP/$label.log" >&2) &
  RUN_PID=$!
  local rc=0
  wait "$RUN_PID" || rc=$?
  RUN_PID=""
  if [ "$rc" != 0 ]; then
    # Keep going: the other sizes still say something (exit 137 = killed, e.g. out of memory).
    log "$label: gossip-convergence failed (exit $rc)"
    echo "- $label ($n nodes): exit $rc; last log line: $(tail -n 1 "$TMP/$label.log" | tr -d '`|' | cut -c1-300)" >>"$TMP/failed.md"
  fi
}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
busy_cores() { # vCPUs busy (not idle, not iowait) over the next $1 seconds, from /proc/stat
  local a b
  read -ra a < <(head -n1 /proc/stat)
  sleep "$1"
  read -ra b < <(head -n1 /proc/stat)
  awk -v s="$1" -v hz="$(getconf CLK_TCK)" \
    -v d="$(( (b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8]) ))" \
    'BEGIN {printf "%.2f", d / hz / s}'
}
BUSY_START=$(busy_cores 3)
: >"$TMP/failed.md"
for n in $ALSO_REAL; do [ "$REAL" = 1 ] || run_one "real-n$n" "$n"; done
for p in $PROTOCOLS; do
  for n in $NODES; do run_one "n$n-$p" "$n" "${CLOCK_ARGS[@]}" --protocol "$p"; done
done
if [ "$CEILING" = 1 ]; then
  REPS=1 DEATH_REPS=0 CONVERGE_TIMEOUT=60s run_one ceiling "$CEILING_NODES" \
    --name-suffix "$(long_suffix)" --endpoint-timeout 20s "${CLOCK_ARGS[@]}"
fi
shopt -s nullglob
jsons=("$TMP"/*.json)
[ ${#jsons[@]} -gt 0 ] || die "no run produced results"

# --- report ----------------------------------------------------------------------------------
mkdir -p "$RESULTS"
OUT="$RESULTS/gossip-$STAMP.md"
{
  echo "# bench/gossip.sh — $STAMP"
  echo
  echo "git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)'), gossip-convergence built $(date -u -r "$BIN" +%FT%TZ); chitchat $(sed -n '/^name = "chitchat"/{n;s/^version = "\(.*\)"/\1/p}' "$ROOT/Cargo.lock")."
  echo "Machine: $(nproc) vCPU ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)), $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo) RAM, kernel $(uname -r)."
  echo "**Shared machine**: other sessions may build or test on the same 2 vCPUs meanwhile. Before the first run, the machine was busy on $BUSY_START of its $(nproc) vCPUs (3 s sample) with load average $LOAD_START; at the end the load average was $(cut -d' ' -f1-3 /proc/loadavg). The \"machine busy\" column below minus what the simulation used (\"simulation CPU\" in real time, at most 1 core in virtual time) is what others used during the bandwidth window. That matters to real-time runs only: a virtual-time run is slower on a busy machine, not different."
  echo "Settings: NODES=\"$NODES\" in $CLOCK time$([ -n "$ALSO_REAL" ] && [ "$REAL" = 0 ] && echo ", ALSO_REAL=\"$ALSO_REAL\" in real time") REPS=$REPS DEATH_REPS=$DEATH_REPS WINDOW=$WINDOW (from $LARGE nodes: LARGE_REPS=$LARGE_REPS LARGE_DEATH_REPS=$LARGE_DEATH_REPS LARGE_WINDOW=$LARGE_WINDOW) GOSSIP_INTERVAL=$GOSSIP_INTERVAL CONVERGE_TIMEOUT=$CONVERGE_TIMEOUT MAX_RSS_MB=$MAX_RSS_MB MAX_WALL=$MAX_WALL SEED=$SEED$([ "$CEILING" = 1 ] && echo "; CEILING=1: $CEILING_NODES nodes with 253-character names, 60 s to converge, one new-endpoint try of 20 s"); wall time $((SECONDS / 60))m$((SECONDS % 60))s."
  echo
  cat <<'EOF'
## How

N chitchat 0.13 nodes run in one process, each built by `meshd::membership::chitchat_config`: meshd's gossip interval, its failure detector (values
under Results) and its wire format (protocol V1, zstd-compressed digests).
They talk over chitchat's in-memory `ChannelTransport`: every message is really serialized and
deserialized, but there is no kernel UDP and no sealing (meshd encrypts every datagram with
ChaCha20-Poly1305). That is fine for convergence: how fast a change spreads is decided by the
rounds (one every gossip interval) and the fan-out (3 peers per round, with a SYN / SYN-ACK / ACK
exchange each), which are chitchat's own; UDP and sealing only add their per-message CPU and
microseconds of latency. Like meshd, the transport refuses a message too long for one sealed
datagram (65,454 bytes), and like UDP it drops a message when the receiver's queue (100) is
full. Node i lists 3 random earlier nodes as seeds, as an operator lists a few existing hosts,
and publishes what meshd publishes: its `node` key (an encoded `NodeInfo`, ~100 bytes) and one
`svc/default/svc-NN` key (an encoded `ServiceInfo`, ~70 bytes). Node names are `node-0001` etc.
(9 characters). All nodes start together, each at a random offset within one interval.

Clock (a column of every table):

- **virtual**: a discrete-event simulation. The nodes run on one tokio `current_thread` runtime
  whose clock is paused: tokio moves it only when every task is idle, straight to the next
  timer. chitchat takes all its time from tokio (its round interval, its failure detector's and
  its state's instants), so every node gossips exactly every interval however long the CPU work
  of N nodes takes, and the result does not depend on the host's speed or load. The measuring
  thread runs the simulation 10 ms of virtual time at a time and looks at the nodes in between,
  while the clock stands still. Not modelled: network latency (a message arrives in the instant
  it is sent, where a LAN takes well under a millisecond), the CPU each node spends on a round
  (a real node spends the "gossip CPU per node" below, a few percent of a core at most), UDP
  and sealing, and contention for CPU on a real host.
- **real**: real time on a multi-thread runtime (one worker per vCPU). The simulation then
  needs N × the CPU of one node, which grows as N²: once the host cannot keep up, rounds run
  late (see gossip rounds/s and timer lateness) and the times measure the host, not gossip.

After every node sees N live nodes (the setup time) and 5 s of settling:

- **bytes/s and msgs/s per node**: everything sent during the window (total from the transport
  ÷ N ÷ seconds; each node receives as much as it sends). "Est. wire" adds, per message, what
  meshd and the network add: 53 bytes of sealing, 8 of UDP, 20 of IPv4 per 1,480-byte fragment.
- **new endpoint**: one node sets a new service key; the measuring thread (not a tokio worker)
  looks at every node every 10 ms and notes when the key appears in its chitchat state, and
  when it appears in its live-nodes watch, which is what meshd rebuilds its proxy view from
  (chitchat refreshes that watch once per round, at the end of the node's own gossip round, so
  it trails the state by up to one interval). Per repetition: the median node, p99 and the last
  node; the headline is the median over repetitions of "the last node". Repetitions start from
  different random nodes, 1 s plus a random part of an interval apart.
- **death**: one node's gossip task is aborted (no goodbye, as `kill -9` or a power cut); time
  until every remaining node has dropped it from its live set.
- **gossip rounds/s per node**: SYNs sent ÷ N ÷ 3. Nominal is 1 / interval (5/s at 200 ms; a
  little more, as a round sometimes also tries a seed or a dead node). Fewer means the
  simulation could not keep up (real time only): the rounds ran late. "In gossip rounds" is the
  time of the last node × the rounds/s achieved meanwhile.
- **timer lateness** (real time only): a tokio task sleeps 50 ms again and again and records
  how late it wakes. chitchat's round timers sit in the same queues, so this is how late rounds
  start. "—" means it never woke in that period: the workers were saturated.
- **gossip CPU per node**: this process's CPU ÷ N, per second (per simulated second in virtual
  time). It is an upper bound for one real node: it includes what the simulation adds (each
  message is serialized, deserialized and compared in one go by `ChannelTransport`, and the
  measuring thread polls), and excludes sealing and UDP.

Aims: a new endpoint known everywhere within 2 s at 1,000 nodes; bandwidth per node flat as N
grows.

## Results

EOF
  "$BIN" report "${jsons[@]}"
  panics=""
  for f in "$TMP"/*.log; do
    count=$(grep -c "panicked at" "$f" || true)
    [ "$count" -gt 0 ] && panics+="- $(basename "$f" .log): $count node gossip task(s) panicked, e.g. \`$(grep -m1 -A1 "panicked at" "$f" | sed 's/^thread .* panicked at [^ ]*\/\(chitchat-[^/]*\/[^ ]*\):$/\1/' | tr '\n' ' ' | tr -d '`')\`"$'\n'
  done
  if [ -n "$panics" ]; then
    echo
    echo "chitchat panics (each one ends that node's gossip; the simulation keeps measuring the others):"
    echo
    printf '%s' "$panics"
  fi
  if [ -s "$TMP/failed.md" ]; then
    echo
    echo "Runs that failed:"
    echo
    cat "$TMP/failed.md"
  fi
} >"$OUT"
cat "$OUT"
log "written to ${OUT#"$ROOT"/}"
