#!/usr/bin/env bash
# Gossip at scale on real processes: N meshd on loopback (127.3.x.y), a real registry, sealed
# UDP gossip at meshd's defaults. Once every node sees every node, over WINDOW seconds: gossip
# bytes and datagrams per node by message kind (meshd's own counters: sealed UDP payload, what a
# NIC would carry less 28 bytes of headers each), what the loopback interface carried meanwhile
# (everything on lo, for the comparison with captures), CPU and RSS per node. Then REPS times: a
# new service on one node until every node's view has it, and a node killed with SIGKILL until
# every other node dropped it (from each node's log timestamps). Prints markdown and writes it to
# bench/results/gossip-real-<UTC time>.md. See BENCHMARKS.md ("Gossip at scale"). Never run by CI.
#
# Environment (defaults in brackets):
#   NODES ["100"]           cluster sizes, one after the other, each from scratch (≤ 2000)
#   WINDOW [30]             seconds of steady-state measurement
#   SETTLE [10]             seconds between convergence and the window
#   REPS [3]                new-service and kill repetitions
#   GOSSIP_INTERVAL [200ms] meshd gossip.interval (meshd's default)
#   MESHD [target/release/meshd]  the meshd binary (A/B: run twice with different binaries)
#   DATA_ROOT [$TMPDIR or /tmp]   where the registry and node directories go
#   READY_TIMEOUT [300]     seconds to wait for the registry, readiness and convergence
#   BUILD [0]               1: cargo build --release even if the binaries exist
set -euo pipefail
export LC_ALL=C

NODES=${NODES:-100}
WINDOW=${WINDOW:-30}
SETTLE=${SETTLE:-10}
REPS=${REPS:-3}
GOSSIP_INTERVAL=${GOSSIP_INTERVAL:-200ms}
DATA_ROOT=${DATA_ROOT:-${TMPDIR:-/tmp}}
READY_TIMEOUT=${READY_TIMEOUT:-300}
BUILD=${BUILD:-0}
REG_LISTEN=127.0.0.1:17730   # not propagation.sh's 17720 nor run.sh's 17710
REG_ADMIN=127.0.0.1:17731
APP_ADDR=127.0.0.1:18099     # the services' app address; nothing needs to listen there

die() { echo "bench/gossip_real.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
BIN="$ROOT/target/release"
MESHD=${MESHD:-$BIN/meshd}
RESULTS="$ROOT/bench/results"
HZ=$(getconf CLK_TCK)

mkdir -p "$DATA_ROOT"
TMP=$(mktemp -d "$DATA_ROOT/meshd-gossip-real.XXXXXX")
OUR_PIDS=()
stop_all() {
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
    for f in "$TMP"/*/registry.log "$TMP"/*/node-0001/meshd.log; do
      [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 5 "$f" >&2; }
    done
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_build=$BUILD
for b in meshctl mesh-registry gossip-real-report; do [ -x "$BIN/$b" ] || need_build=1; done
[ -x "$MESHD" ] || need_build=1
if [ "$need_build" = 1 ]; then
  log "building release binaries (several minutes on 2 cores)"
  (cd "$ROOT" && cargo build --release -p meshd -p mesh-registry -p mesh-bench) ||
    die "cargo build --release failed"
fi
command -v curl >/dev/null || die "curl is required"

deadline_passed() { [ "$SECONDS" -ge "$1" ]; }
node_ip() { echo "127.3.$((($1 - 1) / 200)).$((($1 - 1) % 200 + 1))"; }
node_dir() { printf '%s/node-%04d' "$1" "$2"; }
cpu_ticks() {
  local sum=0 p
  for p in "$@"; do sum=$((sum + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}'))); done
  echo $sum
}
lo_bytes() { awk '/^ *lo:/ {printf "%.0f\n", $2 + $10}' /proc/net/dev; }   # received + transmitted
udp_out() { awk '/^Udp:/ {n++; if (n == 2) print $5}' /proc/net/snmp; }   # OutDatagrams, host-wide
# Every node's /metrics, fetched 16 at a time, into one file.
scrape() { # file ip...
  local out=$1
  shift
  printf '%s\n' "$@" | xargs -P 16 -I{} sh -c 'curl -fsS -m 5 "http://{}:15000/metrics" 2>/dev/null || true' >"$out"
}
# Sum of a counter in a scrape: metric name and a label filter (regex).
metric_sum() { # file name filter
  awk -v n="$2" -v f="$3" '$1 ~ "^"n"(\\{|$)" && $1 ~ f {s += $2} END {printf "%.0f", s}' "$1"
}
members_of() { curl -fsS -m 2 "http://$1:15000/metrics" 2>/dev/null | awk '$1 == "meshd_gossip_members" {print $2}'; }
# `reached total max_ms median_ms` of the first log line matching after `since`.
first_logged() { # message field value since [--at-most] logs...
  local msg=$1 field=$2 value=$3 since=$4
  shift 4
  "$BIN/gossip-real-report" --message "$msg" --field "$field" --value "$value" --since "$since" "$@"
}
wait_logged() { # count message field value since at_most(0/1) logs...
  local want=$1 msg=$2 field=$3 value=$4 since=$5 most=$6 deadline=$((SECONDS + 30)) got
  shift 6
  local flag=()
  [ "$most" = 1 ] && flag=(--at-most)
  while :; do
    got=$("$BIN/gossip-real-report" --count --message "$msg" --field "$field" --value "$value" --since "$since" "${flag[@]}" "$@")
    [ "$got" -ge "$want" ] && return 0
    deadline_passed $deadline && return 1
    sleep 0.5
  done
}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
STEADY="$TMP/steady.md"
KINDS="$TMP/kinds.md"
EVENTS="$TMP/events.md"
: >"$STEADY"; : >"$KINDS"; : >"$EVENTS"

run_size() { # N
  local n=$1 dir="$TMP/n$1" i ip node deadline seeds=()
  local meshctl=("$BIN/meshctl" --credentials "$dir/registry/admin" --registry "$REG_LISTEN")
  mkdir -p "$dir"
  log "N=$n: starting the registry"
  "$BIN/mesh-registry" init --trust-domain mesh.test --data-dir "$dir/registry" \
    --listen $REG_LISTEN --admin-listen $REG_ADMIN >"$dir/registry-init.log" 2>&1 ||
    die "mesh-registry init failed: $(cat "$dir/registry-init.log")"
  echo "max_connections_per_ip = $((n + 100))" >>"$dir/registry/registry.toml"
  "$BIN/mesh-registry" run --config "$dir/registry/registry.toml" >"$dir/registry.log" 2>&1 &
  OUR_PIDS+=($!)
  deadline=$((SECONDS + READY_TIMEOUT))
  until curl -fsS -o /dev/null "http://$REG_ADMIN/ready" 2>/dev/null; do
    deadline_passed $deadline && die "timed out waiting for the registry"
    sleep 0.2
  done
  local services="api"
  for i in $(seq "$REPS"); do services+=",probe-$i"; done
  "${meshctl[@]}" token create --services "$services" --uses 0 >"$dir/token" 2>"$dir/meshctl.log" ||
    die "meshctl token create failed: $(cat "$dir/meshctl.log")"

  log "N=$n: starting $n meshd ($MESHD, gossip every $GOSSIP_INTERVAL)"
  local node_pids=() ips=()
  for i in $(seq "$n"); do
    node=$(node_dir "$dir" "$i")
    ip=$(node_ip "$i")
    ips+=("$ip")
    # Three random earlier nodes as seeds, as an operator's first hosts would be.
    seeds=()
    if [ "$i" -gt 1 ]; then
      for _ in 1 2 3; do seeds+=("\"$(node_ip $((RANDOM % (i - 1) + 1))):17946\""); done
    fi
    mkdir -p "$node/services.d"
    cp "$dir/token" "$node/token"
    cat >"$node/meshd.toml" <<EOF
node_name = "$(basename "$node")"
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
    (cd "$node" && exec env TOKIO_WORKER_THREADS=1 MESHD_LOG="info,meshd::membership=debug,chitchat=warn" \
      "$MESHD" run --config meshd.toml) >"$node/meshd.log" 2>&1 &
    OUR_PIDS+=($!)
    node_pids+=($!)
    # Pace the starts a little: N simultaneous joins are a registry benchmark, not this one.
    [ $((i % 20)) = 0 ] && sleep 1
  done

  log "N=$n: waiting until every node sees $n members"
  local t_start=$SECONDS pending
  deadline=$((SECONDS + READY_TIMEOUT))
  pending=$(seq "$n")
  while [ -n "$pending" ]; do
    local still=""
    for i in $pending; do [ "$(members_of "$(node_ip "$i")")" = "$n" ] || still+=" $i"; done
    pending=$still
    [ -z "$pending" ] && break
    deadline_passed $deadline && die "not converged after ${READY_TIMEOUT}s: $(wc -w <<<"$pending") node(s) short (first: node $(echo $pending | cut -d' ' -f1), sees $(members_of "$(node_ip "${pending%% *}")"))"
    sleep 1
  done
  log "N=$n: converged $((SECONDS - t_start))s after the first start; settling ${SETTLE}s"
  sleep "$SETTLE"

  # Steady state. The scrapes take a moment: the counters' window runs from the middle of the
  # first to the middle of the second; the kernel's (lo, UDP) from the end of the first to the
  # start of the second, so no scrape traffic is counted.
  local kinds=(syn syn_ack ack ping ping_req ping_ack) c0 c1 l0 l1 u0 u1 w0 w1 a0 a1 k
  declare -A s0 s1 d0 d1
  a0=$EPOCHREALTIME
  scrape "$dir/metrics0" "${ips[@]}"
  c0=$(cpu_ticks "${node_pids[@]}"); l0=$(lo_bytes); u0=$(udp_out); w0=$EPOCHREALTIME
  a0=$(awk -v a="$a0" -v b="$w0" 'BEGIN {printf "%.6f", (a + b) / 2}')
  sleep "$WINDOW"
  c1=$(cpu_ticks "${node_pids[@]}"); l1=$(lo_bytes); u1=$(udp_out); w1=$EPOCHREALTIME
  scrape "$dir/metrics1" "${ips[@]}"
  a1=$(awk -v a="$w1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.6f", (a + b) / 2}')
  for k in "${kinds[@]}"; do
    s0[$k]=$(metric_sum "$dir/metrics0" meshd_gossip_traffic_bytes_total "direction=\"sent\".*kind=\"$k\"")
    d0[$k]=$(metric_sum "$dir/metrics0" meshd_gossip_traffic_datagrams_total "direction=\"sent\".*kind=\"$k\"")
    s1[$k]=$(metric_sum "$dir/metrics1" meshd_gossip_traffic_bytes_total "direction=\"sent\".*kind=\"$k\"")
    d1[$k]=$(metric_sum "$dir/metrics1" meshd_gossip_traffic_datagrams_total "direction=\"sent\".*kind=\"$k\"")
  done
  local rss w wm sent=0 dgrams=0 kindrow=""
  rss=$(for p in "${node_pids[@]}"; do awk '/^VmRSS:/ {print $2}' "/proc/$p/status"; done | sort -n |
    awk '{a[NR] = $1} END {printf "%.1f", a[int((NR + 1) / 2)] / 1024}')
  w=$(awk -v a="$w0" -v b="$w1" 'BEGIN {printf "%.6f", b - a}')
  wm=$(awk -v a="$a0" -v b="$a1" 'BEGIN {printf "%.6f", b - a}')
  for k in "${kinds[@]}"; do
    local b=$((s1[$k] - s0[$k])) d=$((d1[$k] - d0[$k]))
    sent=$((sent + b)); dgrams=$((dgrams + d))
    kindrow+=$(awk -v b="$b" -v d="$d" -v n="$n" -v w="$wm" 'BEGIN {
      printf " %.2f | %.1f | %.0f |", b / n / w / 1000, d / n / w, d ? b / d : 0 }')
  done
  echo "| $n |$kindrow" >>"$KINDS"
  awk -v n="$n" -v b="$sent" -v d="$dgrams" -v lo=$((l1 - l0)) -v u=$((u1 - u0)) -v dc=$((c1 - c0)) -v hz="$HZ" -v w="$w" -v wm="$wm" -v rss="$rss" 'BEGIN {
      wire = (b + 28 * d) / n / wm / 1000
      printf "| %d | %.2f | %.1f | %.2f | %.2f | %.1f | %.1f | %s |\n", n, b / n / wm / 1000, d / n / wm, wire, lo / 2 / n / w / 1000, u / n / w, dc / hz / w / n * 1000, rss
    }' >>"$STEADY"

  # A new service on node 1: when does every node's view have it?
  local logs=() r t0 base new_ms=() kill_ms=()
  for i in $(seq "$n"); do logs+=("$(node_dir "$dir" "$i")/meshd.log"); done
  base=$( (grep -o 'mesh view changed services=[0-9]*' "${logs[0]}" || true) | tail -n1 | sed 's/.*=//')
  [ -n "$base" ] || base=1
  for r in $(seq "$REPS"); do
    node=$(node_dir "$dir" 1)
    printf 'name = "probe-%d"\naddress = "%s"\n' "$r" "$APP_ADDR" >"$node/services.d/probe-$r.toml"
    t0=$EPOCHREALTIME
    kill -HUP "${node_pids[0]}"
    wait_logged "$n" "mesh view changed" services $((base + r)) "$t0" 0 "${logs[@]}" ||
      log "N=$n: probe-$r did not reach every node within 30 s"
    new_ms+=("$(first_logged "mesh view changed" services $((base + r)) "$t0" "${logs[@]}")")
    sleep 2
  done

  # A node killed: when has every other node dropped it?
  local alive=$n victim
  for r in $(seq "$REPS"); do
    victim=$((n - r + 1))
    t0=$EPOCHREALTIME
    kill -9 "${node_pids[$((victim - 1))]}"
    alive=$((alive - 1))
    local others=("${logs[@]:0:$alive}")
    wait_logged "$alive" "mesh membership changed" members "$alive" "$t0" 1 "${others[@]}" ||
      log "N=$n: node $victim was not dropped everywhere within 30 s"
    kill_ms+=("$(first_logged "mesh membership changed" members "$alive" "$t0" --at-most "${others[@]}")")
    sleep 3
  done
  {
    for r in "${new_ms[@]}"; do echo "| $n | new service | $r |"; done
    for r in "${kill_ms[@]}"; do echo "| $n | node killed | $r |"; done
  } | awk '{ # "| n | what | reached total max median |"
      split($0, f, "|"); split(f[4], v, " ")
      printf "|%s|%s| %s of %s | %s | %s |\n", f[2], f[3], v[1], v[2], v[3], v[4] }' >>"$EVENTS"
  stop_all
}

for n in $NODES; do
  [[ $n =~ ^[0-9]+$ && $n -ge 2 && $n -le 2000 ]] || die "NODES entries must be 2..2000, got '$n'"
  run_size "$n"
done

mkdir -p "$RESULTS"
OUT="$RESULTS/gossip-real-$STAMP.md"
{
  echo "# bench/gossip_real.sh — $STAMP"
  echo
  echo "git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)'); meshd $MESHD built $(date -u -r "$MESHD" +%FT%TZ); $(nproc) vCPU; kernel $(uname -r); gossip interval $GOSSIP_INTERVAL; window ${WINDOW}s after ${SETTLE}s of settling; TOKIO_WORKER_THREADS=1; wall time $((SECONDS / 60))m$((SECONDS % 60))s."
  echo
  echo "Steady state, per node (sent; received is the same on average). sealed = UDP payload as meshd counts it (its metrics); wire = plus 28 bytes of IPv4 and UDP headers per datagram; lo = all bytes the loopback interface carried in the window, halved (each packet is counted received and transmitted); UDP out = the kernel's UDP datagrams sent, host-wide (/proc/net/snmp) — both per node."
  echo
  echo "| nodes | sealed kB/s | datagrams/s | wire kB/s | lo kB/s | UDP out /s | CPU ‰ of a vCPU | RSS MB (median) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  cat "$STEADY"
  echo
  echo "By message kind, per node: kB/s, datagrams/s, mean bytes per datagram."
  echo
  echo "| nodes | SYN kB/s | /s | B | SYN-ACK kB/s | /s | B | ACK kB/s | /s | B | PING kB/s | /s | B | PING-REQ kB/s | /s | B | PING-ACK kB/s | /s | B |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  cat "$KINDS"
  echo
  echo "Events (ms from the change: service file written and SIGHUP sent, or SIGKILL sent, to each node's log line; 'reached' counts the nodes that logged it within 30 s):"
  echo
  echo "| nodes | event | reached | every node, ms | median node, ms |"
  echo "| --- | --- | --- | --- | --- |"
  cat "$EVENTS"
} >"$OUT"
cat "$OUT"
log "written to ${OUT#"$ROOT"/}"
