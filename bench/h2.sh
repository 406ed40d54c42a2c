#!/usr/bin/env bash
# meshd's HTTP/2 and gRPC-unary proxying measured next to the same requests sent straight to the
# backend (and, for HTTP/2, through the HAProxy mTLS pair), in one run, targets interleaved in
# rounds. Load from h2load (h2c, prior knowledge). Prints a markdown table of medians and writes it
# (plus the raw per-round numbers) to bench/results/h2-<UTC time>.md. The HTTP/1.1 counterpart is
# bench/run.sh; see BENCHMARKS.md. Never run by CI.
#
# Environment (defaults in brackets):
#   ROUNDS [5]            rounds; every target is measured once per round, in a fixed order
#   DURATION [10s]        measured h2load run per target and round
#   WARMUP [2s]           unmeasured h2load run with the same load right before each measured one
#   CLIENTS [32]          h2load connections (-c)
#   STREAMS [10]          concurrent streams per connection (-m)
#   H2LOAD_THREADS [1]    h2load threads (-t)
#   PIN_CPU [1]           CPU of the meshd processes (each TOKIO_WORKER_THREADS=1 under taskset,
#                         like run.sh's meshd-http); "0 1" puts the client side on CPU 0, the
#                         server side on 1
#   BACKEND_THREADS [1]   tokio worker threads of h2-backend (one app process behind a sidecar)
#   TARGETS               override the target list, e.g. "direct-grpc meshd-grpc"
#   BUILD [0]             1: run cargo build --release even if the binaries exist
#   KEEP_PEERS [0]        1: leave the peers running at exit if this script started them
#   READY_TIMEOUT [60]    seconds to wait for the backend, the registry and the meshd nodes
#   HOLD [0]              1: start everything, print targets and pids, measure nothing and wait
#                         for Ctrl-C (for profiling by hand with perf or strace)
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CLIENTS=${CLIENTS:-32}
STREAMS=${STREAMS:-10}
H2LOAD_THREADS=${H2LOAD_THREADS:-1}
PIN_CPU=${PIN_CPU:-1}
read -r PIN_CLIENT PIN_SERVER <<<"$PIN_CPU"
PIN_SERVER=${PIN_SERVER:-$PIN_CLIENT}
BACKEND_THREADS=${BACKEND_THREADS:-1}
BUILD=${BUILD:-0}
KEEP_PEERS=${KEEP_PEERS:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
BODY_LEN=1024
GRPC_PAYLOAD=100                          # bytes of the one message of each gRPC request
GRPC_FRAME=$((GRPC_PAYLOAD + 5))          # plus the 5-byte length prefix
GRPC_PATH=/bench.Echo/Unary
BACKEND=127.0.0.1:18090

die() { echo "bench/h2.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
PEERS="$ROOT/../shared/bench/peers.sh"
[ -f "$PEERS" ] || die "benchmark peers script not found at $PEERS (expected ../shared/bench/peers.sh next to the repository)"
export RUN=${RUN:-${TMPDIR:-/tmp}/meshd-peers}   # peers.sh's state directory
BIN="$ROOT/target/release"
RESULTS="$ROOT/bench/results"

# --- cleanup -------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshd-bench-h2.XXXXXX")
OUR_PIDS=()
PEERS_STARTED=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${OUR_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${OUR_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  if [ "$PEERS_STARTED" = 1 ] && [ "$KEEP_PEERS" != 1 ]; then bash "$PEERS" stop >/dev/null 2>&1 || true; fi
  if [ "$rc" != 0 ] && [ -d "$TMP" ]; then
    for f in "$TMP"/*.log; do [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 5 "$f" >&2; }; done
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- binaries and tools --------------------------------------------------------------------
need_build=$BUILD
for b in meshd meshctl mesh-registry h2-backend; do [ -x "$BIN/$b" ] || need_build=1; done
if [ "$need_build" = 1 ]; then
  log "building release binaries (several minutes on 2 cores)"
  (cd "$ROOT" && cargo build --release -p meshd -p mesh-registry -p mesh-bench) ||
    die "cargo build --release failed"
fi
command -v taskset >/dev/null || die "taskset (util-linux) is required"
# h2load (the load) and nghttp (to see gRPC trailers, which curl 7.88 does not print) both come
# from nghttp2-client; installed here the way peers.sh installs its tools.
if ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null; then
  log "installing nghttp2-client (h2load, nghttp)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; } ||
    die "could not install nghttp2-client"
fi

# --- peers ---------------------------------------------------------------------------------
if bash "$PEERS" check >/dev/null 2>&1; then
  log "peers already running; reusing them (left running at exit)"
else
  log "starting peers ($PEERS)"
  bash "$PEERS" stop >/dev/null 2>&1 || true
  # gen-certs.sh issues 2-day leaf certificates and peers.sh only generates them once.
  if [ -f "$RUN/certs/server.crt" ] && ! openssl x509 -checkend 3600 -noout -in "$RUN/certs/server.crt" >/dev/null 2>&1; then
    log "peer certificates in $RUN/certs expire within the hour; regenerating"
    rm -rf "$RUN/certs"
  fi
  PEERS_STARTED=1
  bash "$PEERS" start || die "peers.sh start failed"
  bash "$PEERS" check >&2 || die "peers.sh check failed: a peer does not answer /1k with $BODY_LEN bytes"
fi
command -v curl >/dev/null || die "curl not found (peers.sh start installs it)"

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
wait_for() { # description, command...: retries until success or READY_TIMEOUT
  local what=$1; shift
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${READY_TIMEOUT}s waiting for $what"
    sleep 0.2
  done
}

# --- the backend -----------------------------------------------------------------------------
! port_busy "${BACKEND%:*}" "${BACKEND#*:}" || die "$BACKEND is in use (a previous run still alive?)"
"$BIN/h2-backend" --addr "$BACKEND" --threads "$BACKEND_THREADS" >"$TMP/h2-backend.log" 2>&1 &
OUR_PIDS+=($!)
BACKEND_PID=$!
wait_for "h2-backend to print ready" grep -qx ready "$TMP/h2-backend.log"

# --- the mesh: one registry, one meshd pair per protocol -------------------------------------
# variant -> client IP, server IP, upstream port (the app-facing listener of the client meshd).
# Distinct from run.sh's (127.0.0.12-17, :18004-18006, registry :17710), so both can be set up.
VARIANTS="h2 grpc"
declare -A PROTO=([h2]=http2 [grpc]=grpc)
declare -A CLIENT_IP=([h2]=127.0.0.22 [grpc]=127.0.0.24)
declare -A SERVER_IP=([h2]=127.0.0.23 [grpc]=127.0.0.25)
declare -A UP_PORT=([h2]=18016 [grpc]=18017)
declare -A CLIENT_PID=() SERVER_PID=()
REG_LISTEN=127.0.0.1:17720
REG_ADMIN=127.0.0.1:17721

for a in $REG_LISTEN $REG_ADMIN; do ! port_busy "${a%:*}" "${a#*:}" || die "$a is in use (a previous run still alive?)"; done
for v in $VARIANTS; do
  ! port_busy 127.0.0.1 "${UP_PORT[$v]}" || die "127.0.0.1:${UP_PORT[$v]} is in use (a previous run still alive?)"
  for ip in "${CLIENT_IP[$v]}" "${SERVER_IP[$v]}"; do
    for p in 15000 15008 17946; do ! port_busy "$ip" $p || die "$ip:$p is in use (a previous run still alive?)"; done
  done
done

log "starting the registry and meshd nodes in $TMP"
"$BIN/mesh-registry" init --trust-domain mesh.test --data-dir "$TMP/registry" \
  --listen $REG_LISTEN --admin-listen $REG_ADMIN >"$TMP/registry-init.log" 2>&1 ||
  die "mesh-registry init failed: $(cat "$TMP/registry-init.log")"
"$BIN/mesh-registry" run --config "$TMP/registry/registry.toml" >"$TMP/registry.log" 2>&1 &
OUR_PIDS+=($!)
wait_for "the registry (http://$REG_ADMIN/ready)" curl -fsS "http://$REG_ADMIN/ready"

token() { "$BIN/meshctl" --credentials "$TMP/registry/admin" token create --services "$1" 2>>"$TMP/meshctl.log"; }

start_node() { # variant name ip gossip-seed-ip cpu service-file-body; sets STARTED_PID
  local v=$1 name=$2 ip=$3 seed=$4 cpu=$5 svc=$6 dir="$TMP/$2"
  mkdir -p "$dir/services.d"
  cat >"$dir/node.toml" <<EOF
node_name = "$name"
data_dir = "data"
services_dir = "services.d"
[registry]
address = "$REG_LISTEN"
join_token_file = "token"
[gossip]
bind = "$ip:17946"
seeds = ["$seed:17946"]
cluster_id = "bench-$v"
[inbound]
bind = "$ip:15008"
[admin]
bind = "$ip:15000"
EOF
  printf '%s\n' "$svc" >"$dir/services.d/svc.toml"
  local svc_name
  svc_name=$(sed -n 's/^name = "\(.*\)"/\1/p' <<<"$svc")
  token "$svc_name" >"$dir/token" || die "meshctl token create --services $svc_name failed"
  # Pinned like run.sh's meshd-http: one worker thread per meshd, under taskset.
  (cd "$dir" && exec env TOKIO_WORKER_THREADS=1 taskset -c "$cpu" "$BIN/meshd" run --config node.toml) >"$TMP/$name.log" 2>&1 &
  OUR_PIDS+=($!)
  STARTED_PID=$!
}

for v in $VARIANTS; do
  start_node "$v" "server-$v" "${SERVER_IP[$v]}" "${CLIENT_IP[$v]}" "$PIN_SERVER" "name = \"backend-$v\"
address = \"$BACKEND\"
protocol = \"${PROTO[$v]}\""
  SERVER_PID[$v]=$STARTED_PID
  start_node "$v" "client-$v" "${CLIENT_IP[$v]}" "${SERVER_IP[$v]}" "$PIN_CLIENT" "name = \"bench-client-$v\"
address = \"127.0.0.1:18999\"
[[upstreams]]
service = \"backend-$v\"
bind = \"127.0.0.1:${UP_PORT[$v]}\""
  CLIENT_PID[$v]=$STARTED_PID
done

# The gRPC request: one length-prefixed message (flag 0, 4-byte big-endian length, payload).
GRPC_REQ="$TMP/grpc-request.bin"
# shellcheck disable=SC2059 # the format is the four length bytes as \xNN escapes
{ printf '\0'; printf "$(printf %08x "$GRPC_PAYLOAD" | sed 's/../\\x&/g')"; head -c "$GRPC_PAYLOAD" /dev/zero | tr '\0' g; } >"$GRPC_REQ"
[ "$(wc -c <"$GRPC_REQ")" = "$GRPC_FRAME" ] || die "the gRPC request file is not $GRPC_FRAME bytes"
GRPC_HEADERS=(-H 'content-type: application/grpc' -H 'te: trailers')

h2_ok() { # port: GET /1k over h2c answers 200 with the 1 KiB body over HTTP/2
  [ "$(curl -s --http2-prior-knowledge -o /dev/null -w '%{http_code}:%{size_download}:%{http_version}' \
    "http://127.0.0.1:$1/1k")" = "200:$BODY_LEN:2" ]
}
grpc_ok() { # port: the unary echo answers 200, returns the request message unchanged, grpc-status 0
  local port=$1 url="http://127.0.0.1:$1$GRPC_PATH" out code
  out=$(h2load -n 1 -c 1 -d "$GRPC_REQ" "${GRPC_HEADERS[@]}" "$url" 2>&1) || return 1
  grep -q '^requests: 1 total, 1 started, 1 done, 1 succeeded, 0 failed' <<<"$out" || return 1
  grep -q '^status codes: 1 2xx' <<<"$out" || return 1
  code=$(curl -s --http2-prior-knowledge -o "$TMP/grpc-response.$port" -w '%{http_code}:%{http_version}' \
    "${GRPC_HEADERS[@]}" --data-binary "@$GRPC_REQ" "$url") || return 1
  [ "$code" = "200:2" ] || return 1
  cmp -s "$GRPC_REQ" "$TMP/grpc-response.$port" || return 1
  # curl 7.88 neither prints nor dumps HTTP/2 trailers, so read them from nghttp's frame log:
  # exactly one grpc-status on the stream, and it is 0 (a trailers-only error has it too).
  out=$(nghttp -v -n -d "$GRPC_REQ" "${GRPC_HEADERS[@]}" "$url" 2>&1) || return 1
  grep -aq 'recv (stream_id=[0-9]*) :status: 200' <<<"$out" || return 1
  [ "$(grep -ac 'recv (stream_id=[0-9]*) grpc-status:' <<<"$out")" = 1 ] || return 1
  grep -aq 'recv (stream_id=[0-9]*) grpc-status: 0$' <<<"$out"
}

wait_for "GET /1k over h2c from h2-backend ($BACKEND)" h2_ok "${BACKEND#*:}"
grpc_ok "${BACKEND#*:}" || die "the gRPC echo on h2-backend ($BACKEND) does not answer with grpc-status 0"
for v in $VARIANTS; do
  for ip in "${CLIENT_IP[$v]}" "${SERVER_IP[$v]}"; do
    wait_for "meshd at $ip to be ready (http://$ip:15000/ready)" curl -fsS "http://$ip:15000/ready"
  done
  wait_for "gossip to show backend-$v to client-$v" \
    bash -c "curl -fsS http://${CLIENT_IP[$v]}:15000/members | grep -q 'backend-$v\"'"
  for p in ${CLIENT_PID[$v]} ${SERVER_PID[$v]}; do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = meshd ] || die "pid $p is not meshd (taskset/env did not exec?)"
  done
done
wait_for "GET /1k over h2c through meshd (http2 pair, 127.0.0.1:${UP_PORT[h2]})" h2_ok "${UP_PORT[h2]}"
# Retried only while the path comes up; once one call works, a failing check is fatal below.
wait_for "a gRPC unary call through meshd (grpc pair, 127.0.0.1:${UP_PORT[grpc]})" grpc_ok "${UP_PORT[grpc]}"
h2_ok 18001 || die "HAProxy (127.0.0.1:18001) does not answer GET /1k over h2c"

# --- targets ---------------------------------------------------------------------------------
declare -A PORT=([direct-h2]=${BACKEND#*:} [meshd-h2]=${UP_PORT[h2]} [haproxy-h2]=18001
  [direct-grpc]=${BACKEND#*:} [meshd-grpc]=${UP_PORT[grpc]})
declare -A KIND=([direct-h2]=h2 [meshd-h2]=h2 [haproxy-h2]=h2 [direct-grpc]=grpc [meshd-grpc]=grpc)
declare -A REF=([h2]=direct-h2 [grpc]=direct-grpc)
DEFAULT_TARGETS="direct-h2 meshd-h2 haproxy-h2 direct-grpc meshd-grpc"
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
for t in $TARGETS; do [ -n "${PORT[$t]:-}" ] || die "unknown target '$t' (known: $DEFAULT_TARGETS)"; done

# Before measuring: every gRPC target must really answer the echo with grpc-status 0 (h2load
# counts a trailers-only grpc-status 13 as a successful 200).
for t in $TARGETS; do
  if [ "${KIND[$t]}" = grpc ]; then
    grpc_ok "${PORT[$t]}" || die "$t (127.0.0.1:${PORT[$t]}): the gRPC echo did not return 200 + the message + grpc-status 0"
  fi
done

# What the shared peers cannot be measured on, checked rather than assumed.
nginx_h2=$(h2load -n 1 -c 1 "http://127.0.0.1:18002/1k" 2>&1 | sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p')
NOTES=(
  "haproxy-h2: HAProxy's client side (127.0.0.1:18001, mode http) detects the HTTP/2 preface on its clear-text listener and accepts h2c; it forwards as HTTP/1.1 over its pooled mTLS connections to the server-side HAProxy and on to the nginx backend (127.0.0.1:18080, HTTP/1.1), not to h2-backend. Its ratio to direct-h2 therefore compares different backends too."
  "nginx: not an HTTP/2 target. The nginx pair's client listener (127.0.0.1:18002) speaks only HTTP/1.1 in the shared config (no http2 on the listen directive); h2load with prior knowledge got ${nginx_h2:-0} of 1 requests through."
  "gRPC through haproxy or nginx: not measured. Both shared pairs forward HTTP/1.1 to their nginx backend, which cannot carry gRPC (HTTP/2 with trailers)."
)

pids_of() { # the processes whose CPU and memory a target is charged with
  case $1 in
    direct-*) echo "$BACKEND_PID" ;;
    meshd-*) echo "${CLIENT_PID[${1#meshd-}]} ${SERVER_PID[${1#meshd-}]}" ;;
    haproxy-h2) bash "$PEERS" pids haproxy ;;
  esac
}
cpu_ticks() { # utime+stime of all threads; fields after "(comm)" so spaces in comm are harmless
  local sum=0 p f
  for p in "$@"; do
    f=$(sed 's/^.*) //' "/proc/$p/stat") || die "process $p is gone"
    sum=$((sum + $(awk '{print $12 + $13}' <<<"$f")))
  done
  echo $sum
}
rss_list() { # VmRSS in kB of each process, comma-separated, in the order given
  local p out=""
  for p in "$@"; do out+="${out:+,}$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")"; done
  echo "$out"
}
HZ=$(getconf CLK_TCK)

machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# This shell plus every child it has waited for (h2load, curl, awk...).
self_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $12 + $13 + $14 + $15}'; }

h2load_args() { # target: the h2load arguments after the load shape
  local t=$1 url="http://127.0.0.1:${PORT[$1]}"
  if [ "${KIND[$t]}" = grpc ]; then
    echo "-d $GRPC_REQ $url$GRPC_PATH"
  else
    echo "$url/1k"
  fi
}
load() { # target duration: one h2load run, output on stdout
  local t=$1 d=$2 args
  read -ra args <<<"$(h2load_args "$t")"
  if [ "${KIND[$t]}" = grpc ]; then
    h2load -t "$H2LOAD_THREADS" -c "$CLIENTS" -m "$STREAMS" -D "$d" "${GRPC_HEADERS[@]}" "${args[@]}"
  else
    h2load -t "$H2LOAD_THREADS" -c "$CLIENTS" -m "$STREAMS" -D "$d" "${args[@]}"
  fi
}

RAW="$TMP/raw.tsv"
printf 'round\ttarget\tvalid\treq_per_s\tsucceeded\tfailed\terrored\ttimeout\tstatus_2xx\tbody_bytes\tmean_us\tmax_us\tcpu_s\tcpu_s_per_1k\trss_kb\tother_vcpu\tproblem\n' >"$RAW"

measure() { # round target
  local r=$1 t=$2 pids known out c0 c1 rss m0 s0 k0 w0 other expect
  pids=$(pids_of "$t" | tr '\n' ' ')
  # A separate unmeasured run, not h2load --warm-up-time: with that option h2load's "finished in"
  # includes the warm-up, its traffic totals disagree, and the CPU read around the process would
  # include warm-up requests that h2load does not count.
  load "$t" "$WARMUP" >"$TMP/warmup.out" 2>&1 || die "h2load warm-up failed on $t: $(tail -n 3 "$TMP/warmup.out")"
  known=$(echo "$pids" "$BACKEND_PID" | tr ' ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')
  # shellcheck disable=SC2086 # pid lists are meant to split
  { m0=$(machine_busy); s0=$(self_ticks); k0=$(cpu_ticks $known); w0=$EPOCHREALTIME; c0=$(cpu_ticks $pids); }
  out=$(load "$t" "$DURATION" 2>&1) || die "h2load failed on $t: $(tail -n 3 <<<"$out")"
  # shellcheck disable=SC2086
  { c1=$(cpu_ticks $pids); rss=$(rss_list $pids); }
  # CPU used during the run by anything other than this script, its children, the target and
  # the backend: the shared machine's background noise, in average vCPUs.
  # shellcheck disable=SC2086
  other=$(awk -v m=$(($(machine_busy) - m0)) -v s=$(($(self_ticks) - s0)) -v k=$(($(cpu_ticks $known) - k0)) \
    -v hz="$HZ" -v w="$(awk -v a="$w0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" \
    'BEGIN {o = (m - s - k) / hz / w; printf "%.2f", o < 0 ? 0 : o}')
  printf '=== round %s %s\n%s\n' "$r" "$t" "$out" >>"$TMP/h2load.log"
  # Every response must carry its whole body: /1k 1,024 bytes, the echo 105. This is also what
  # catches gRPC errors, which h2load counts as successes (HTTP 200, trailers-only, no body).
  expect=$BODY_LEN; [ "${KIND[$t]}" = grpc ] && expect=$GRPC_FRAME
  awk -v r="$r" -v t="$t" -v dt=$((c1 - c0)) -v hz="$HZ" -v rss="$rss" -v other="$other" -v expect="$expect" '
    function us(v) { # h2load prints 517us, 1.05ms, 2.3s
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      if (v ~ /s$/) return v * 1000000
      return v + 0
    }
    /^finished in / { rps = $4 + 0 }
    /^requests: / { done = $6; ok = $8; failed = $10; errored = $12; timeout = $14; seen = 1 }
    /^status codes: / { s2xx = $3 }
    /^traffic: / { if (match($0, /\(([0-9]+)\) data/)) { d = substr($0, RSTART + 1, RLENGTH - 7) } }
    /^time for request:/ { max = us($5); mean = us($6) }
    END {
      problem = ""
      if (!seen) problem = "no h2load summary"
      else if (ok == 0) problem = "nothing succeeded"
      else if (failed + errored + timeout > 0) problem = sprintf("%d failed, %d errored, %d timed out", failed, errored, timeout)
      # h2load can count a 2xx for a request still in flight when the run ends (2xx > succeeded).
      else if (s2xx < ok) problem = sprintf("%d of %d responses not 2xx", ok - s2xx, ok)
      else if (d < ok * expect) problem = sprintf("%d body bytes for %d responses of %d bytes (short or error responses)", d, ok, expect)
      cpu = dt / hz
      per1k = (ok > 0) ? cpu / (ok / 1000) : 0
      valid = (problem == "") ? "yes" : "NO"
      if (problem == "") problem = "-"
      printf "%s\t%s\t%s\t%.0f\t%d\t%d\t%d\t%d\t%d\t%.0f\t%.0f\t%.0f\t%.2f\t%.4f\t%s\t%s\t%s\n", r, t, valid, rps, ok, failed, errored, timeout, s2xx, d, mean, max, cpu, per1k, rss, other, problem
    }' <<<"$out" | tee -a "$RAW" >&2
}

if [ "${HOLD:-0}" = 1 ]; then   # set up, then wait: for profiling by hand (perf, strace)
  for t in $TARGETS; do log "$t: $(h2load_args "$t")  pids: $(pids_of "$t" | tr '\n' ' ')"; done
  log "gRPC request body: $GRPC_REQ (add ${GRPC_HEADERS[*]})"
  log "HOLD=1: everything is up; Ctrl-C (or kill $$) to clean up"
  trap 'exit 0' INT TERM
  while :; do sleep 1; done
fi

log "measuring: $ROUNDS rounds of [$TARGETS], h2load -t$H2LOAD_THREADS -c$CLIENTS -m$STREAMS, $WARMUP warm-up + $DURATION each"
for r in $(seq "$ROUNDS"); do
  for t in $TARGETS; do measure "$r" "$t"; done
done

# --- report ----------------------------------------------------------------------------------
col() { awk -F'\t' -v t="$1" -v c="$2" 'NR > 1 && $2 == t && $3 == "yes" {print $c}' "$RAW"; }   # valid rounds only
median() { sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
range() { sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {if (NR == 0) print "—"; else printf "%.1f–%.1fk", lo / 1000, hi / 1000}'; }
rss_median() { # per-process medians of the comma-separated RSS lists, "a + b" MB
  awk -F, '{for (i = 1; i <= NF; i++) print i "\t" $i}' | sort -k1,1n -k2,2g |
    awk -F'\t' '{v[$1, ++n[$1]] = $2; if ($1 > k) k = $1}
      END {if (k == 0) {print "—"; exit}
        for (i = 1; i <= k; i++) {m = n[i]; x = (m % 2) ? v[i, (m + 1) / 2] : (v[i, m / 2] + v[i, m / 2 + 1]) / 2
          s = s (i > 1 ? " + " : "") sprintf("%.1f", x / 1024)}
        print s}'
}
declare -A MED=()
for t in $TARGETS; do
  for c in 4 11 12 14; do MED[$t,$c]=$(col "$t" $c | median); done
  MED[$t,range]=$(col "$t" 4 | range)
  MED[$t,rss]=$(col "$t" 15 | rss_median)
  MED[$t,valid]="$(col "$t" 3 | wc -l)/$(awk -F'\t' -v t="$t" 'NR > 1 && $2 == t' "$RAW" | wc -l)"
done
describe() {
  case $1 in
    direct-h2) echo "h2c → h2-backend" ;;
    meshd-h2) echo "h2c → meshd → mTLS (HTTP/2) → meshd → h2c → h2-backend; protocol = \"http2\"" ;;
    haproxy-h2) echo "h2c → HAProxy → mTLS (HTTP/1.1, pooled) → HAProxy → HTTP/1.1 → nginx backend" ;;
    direct-grpc) echo "gRPC unary → h2-backend" ;;
    meshd-grpc) echo "gRPC unary → meshd → mTLS (HTTP/2) → meshd → h2c → h2-backend; protocol = \"grpc\"" ;;
  esac
}
who() {
  case $1 in direct-*) echo "h2-backend" ;; meshd-*) echo "client + server meshd" ;; haproxy-h2) echo "client + server HAProxy" ;; esac
}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
OUT="$RESULTS/h2-$STAMP.md"
{
  echo "# bench/h2.sh — $STAMP"
  echo
  echo "git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)'), meshd binary built $(date -u -r "$BIN/meshd" +%FT%TZ); $(nproc) vCPU; kernel $(uname -r); $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1); $(h2load --version | head -n1)"
  echo "Medians of the valid rounds of $ROUNDS. Load: h2load -t$H2LOAD_THREADS -c$CLIENTS -m$STREAMS -D $DURATION over h2c (prior knowledge), after an unmeasured $WARMUP run; HTTP/2: GET /1k ($BODY_LEN-byte body); gRPC: POST $GRPC_PATH, one $GRPC_PAYLOAD-byte message, echoed, grpc-status 0 in the trailers. Latency: h2load's mean and max \"time for request\" at saturation (closed loop, $((CLIENTS * STREAMS)) requests in flight). CPU and RSS: the target's proxy processes (direct: h2-backend, $BACKEND_THREADS worker thread(s))."
  echo "Each meshd with TOKIO_WORKER_THREADS=1 under taskset (client side on CPU $PIN_CLIENT, server side on CPU $PIN_SERVER). A round is valid when every request succeeded with a 2xx and its whole body; invalid rounds are listed below and left out of the medians."
  echo "Background: other processes used $(awk -F'\t' 'NR > 1 {print $16}' "$RAW" | median | xargs printf %.2f) vCPU (median; max $(awk -F'\t' 'NR > 1 {print $16}' "$RAW" | sort -g | tail -n1)) while targets were measured; wall time $((SECONDS / 60))m$((SECONDS % 60))s."
  echo
  echo "| target | path of a request | req/s (× direct) | req/s range | mean / max time per request, ms | vCPU·s per 1k req (× direct) | RSS, MB | charged | valid rounds |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for t in $TARGETS; do
    ref=${REF[${KIND[$t]}]}
    [[ " $TARGETS " == *" $ref "* ]] || ref=""
    awk -v t="$t" -v path="$(describe "$t")" -v rps="${MED[$t,4]}" -v rng="${MED[$t,range]}" \
      -v mean="${MED[$t,11]}" -v max="${MED[$t,12]}" -v cpu="${MED[$t,14]}" -v rss="${MED[$t,rss]}" \
      -v who="$(who "$t")" -v valid="${MED[$t,valid]}" \
      -v drps="${ref:+${MED[$ref,4]}}" -v dcpu="${ref:+${MED[$ref,14]}}" 'BEGIN {
        if (rps == "nan") { printf "| %s | %s | no valid round | — | — | — | — | %s | %s |\n", t, path, who, valid; exit }
        ratio = (drps != "" && drps != "nan" && drps > 0) ? sprintf(" (%.2f)", rps / drps) : ""
        cratio = (dcpu != "" && dcpu != "nan" && dcpu > 0) ? sprintf(" (%.1f)", cpu / dcpu) : ""
        printf "| %s | %s | %.1fk%s | %s | %.2f / %.1f | %.3f%s | %s | %s | %s |\n", t, path, rps / 1000, ratio, rng, mean / 1000, max / 1000, cpu, cratio, rss, who, valid
      }'
  done
  echo
  echo "Ratios are to the direct target of the same protocol (direct-h2, direct-grpc). RSS: each charged process at the end of the measured run."
  echo
  for n in "${NOTES[@]}"; do echo "- $n"; done
  awk -F'\t' 'NR > 1 && $3 != "yes" {printf "%s- round %s, %s: %s\n", (n++ ? "" : "\n**WARNING: invalid rounds (left out of the medians):**\n\n"), $1, $2, $17}' "$RAW"
  awk -F'\t' 'NR > 1 && $16 > 0.25 {n++} END {if (n) printf "\n**WARNING: %d measurement(s) ran while other processes used more than 0.25 vCPU (other_vcpu); consider a rerun on a quiet machine.**\n", n}' "$RAW"
  echo
  echo "Per round:"
  echo
  echo '```'
  column -t -s $'\t' "$RAW" 2>/dev/null || cat "$RAW"
  echo '```'
} >"$OUT"
cp "$TMP/h2load.log" "$RESULTS/h2-$STAMP.h2load.log"
cat "$OUT"
log "written to ${OUT#"$ROOT"/}"
