#!/usr/bin/env bash
# meshd's proxy pair measured side by side with HAProxy and nginx mTLS pairs on loopback, in one
# run, targets interleaved in rounds. Prints a markdown table of medians and writes it (plus the
# raw per-round numbers) to bench/results/. See BENCHMARKS.md. Never run by CI.
#
# Environment (defaults in brackets):
#   ROUNDS [5]            rounds; every target is measured once per round, in a fixed order
#   DURATION [10s]        wrk saturation run per target and round (wrk -t1 -c32)
#   LAT_DURATION [10s]    open-loop latency run per target and round
#   RATE [1000]           requests/s of the latency run, over LAT_CONNS [16] keep-alive connections
#   MESHD_VARIANTS ["pinned default http"]
#                         pinned:  each meshd with TOKIO_WORKER_THREADS=1 under taskset -c PIN_CPU
#                         default: each meshd with tokio's default runtime (one worker per CPU)
#                         http:    as pinned, with the backend declared protocol = "http": meshd
#                                  proxies each request (L7, HTTP/2 between the hosts); metrics and
#                                  the access log on (the defaults; the log is JSON lines to a file)
#                         http-quiet:    as http, access log off and no trace sampling (metrics
#                                        cannot be turned off)
#                         http-trace1:   as http, spans exported to an OTLP collector (otlp-sink)
#                                        at 1% sampling
#                         http-trace100: as http-trace1 at 100% sampling
#                         http-base:     as http, run from the binary BASE_MESHD (A/B of a change
#                                        in one run: build the baseline, copy it aside, rebuild)
#                         http-alt:      as http-base, from ALT_MESHD (a third binary in the run)
#                         east-west:     as http, across two sites: the client meshd (site a) reaches
#                                        the server meshd (site b) through site b's east-west
#                                        gateway (TLS passed through, never decrypted); charged
#                                        with both gateways (site a's is off the data path: WAN
#                                        gossip only). Compare with http in the same run.
#                         ingress:       an HTTPS ingress gateway meshd (certificate from a file,
#                                        TLS 1.3) in front of the http server-side meshd; adds the
#                                        targets meshd-ingress, haproxy-ingress and nginx-ingress
#                                        (HAProxy and nginx terminating the same HTTPS in front of
#                                        their mTLS pairs), all measured over https
#   BASE_MESHD            meshd binary of the http-base variant (its file name must be meshd)
#   ALT_MESHD             meshd binary of the http-alt variant (its file name must be meshd)
#   MESHD_BIN [target/release/meshd]
#                         meshd binary of every other variant (bench/pgo.sh runs an instrumented
#                         one; its file name must be meshd)
#   PIN_CPU [1]           CPU of the pinned meshd processes: "1" puts both on CPU 1 (one CPU for
#                         the pair); "0 1" puts the client-side meshd on CPU 0, the server side on 1
#   TARGETS               override the target list, e.g. "direct meshd-pinned haproxy-l4"
#   BUILD [0]             1: run cargo build --release even if the binaries exist
#   KEEP_PEERS [0]        1: leave the peers running at exit if this script started them
#   READY_TIMEOUT [60]    seconds to wait for the registry and the meshd nodes
#   HOLD [0]              1: start everything, print targets and pids, measure nothing and wait
#                         for Ctrl-C (for profiling by hand with perf or strace)
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
LAT_DURATION=${LAT_DURATION:-10s}
RATE=${RATE:-1000}
LAT_CONNS=${LAT_CONNS:-16}
MESHD_VARIANTS=${MESHD_VARIANTS:-pinned default http}
PIN_CPU=${PIN_CPU:-1}
read -r PIN_CLIENT PIN_SERVER <<<"$PIN_CPU"
PIN_SERVER=${PIN_SERVER:-$PIN_CLIENT}
BUILD=${BUILD:-0}
KEEP_PEERS=${KEEP_PEERS:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
BODY_LEN=1024

die() { echo "bench/run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null) ||
  die "not inside the meshd git repository"
PEERS="$ROOT/../shared/bench/peers.sh"
[ -f "$PEERS" ] || die "benchmark peers script not found at $PEERS (expected ../shared/bench/peers.sh next to the repository)"
export RUN=${RUN:-${TMPDIR:-/tmp}/meshd-peers}   # peers.sh's state directory
BIN="$ROOT/target/release"
RESULTS="$ROOT/bench/results"
# The nodes start in their own directories: binaries given relative to here must still work.
for v in MESHD_BIN BASE_MESHD ALT_MESHD; do
  if [ -n "${!v:-}" ] && [ -e "${!v}" ]; then printf -v "$v" '%s' "$(realpath "${!v}")"; fi
done

# --- cleanup -------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshd-bench.XXXXXX")
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
for b in meshd meshctl mesh-registry mesh-bench otlp-sink; do [ -x "$BIN/$b" ] || need_build=1; done
if [ "$need_build" = 1 ]; then
  log "building release binaries (several minutes on 2 cores)"
  (cd "$ROOT" && cargo build --release -p meshd -p mesh-registry -p mesh-bench) ||
    die "cargo build --release failed"
fi
command -v taskset >/dev/null || die "taskset (util-linux) is required"

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
command -v wrk >/dev/null || die "wrk not found (peers.sh start installs it)"
command -v curl >/dev/null || die "curl not found (peers.sh start installs it)"

# --- the mesh: one registry, one meshd pair per variant ------------------------------------
# variant -> client IP, server IP, upstream port (the app-facing listener of the client meshd)
# Not the 127.0.0.2/.3 and :17700 of the getting-started example, so a dev mesh can keep running.
declare -A CLIENT_IP=([pinned]=127.0.0.12 [default]=127.0.0.14 [http]=127.0.0.16
  [http-quiet]=127.0.0.18 [http-trace1]=127.0.0.20 [http-trace100]=127.0.0.22 [http-base]=127.0.0.24
  [http-alt]=127.0.0.26 [ingress]=127.0.0.28 [east-west]=127.0.0.30)
declare -A SERVER_IP=([pinned]=127.0.0.13 [default]=127.0.0.15 [http]=127.0.0.17
  [http-quiet]=127.0.0.19 [http-trace1]=127.0.0.21 [http-trace100]=127.0.0.23 [http-base]=127.0.0.25
  [http-alt]=127.0.0.27 [ingress]=127.0.0.29 [east-west]=127.0.0.31)
# For east-west: site b's gateway (on the data path) and site a's (republishes b's services).
EW_GW_B=127.0.0.32
EW_GW_A=127.0.0.33
# For ingress: the gateway's https listener.
declare -A UP_PORT=([pinned]=18004 [default]=18005 [http]=18006 [http-quiet]=18007
  [http-trace1]=18008 [http-trace100]=18009 [http-base]=18010 [http-alt]=18011 [ingress]=18012 [east-west]=18013)
# Observability settings of each variant (appended to its nodes' meshd.toml).
OTLP=127.0.0.1:17712
declare -A OBSERVE=(
  [http-quiet]=$'[access_log]\nenabled = false\n[tracing]\nsampling = 0.0'
  [http-trace1]=$'[tracing]\ncollector = "http://'$OTLP$'"\nsampling = 0.01'
  [http-trace100]=$'[tracing]\ncollector = "http://'$OTLP$'"\nsampling = 1.0'
)
declare -A MESHD_PIDS=()
REG_LISTEN=127.0.0.1:17710
REG_ADMIN=127.0.0.1:17711

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
wait_for() { # description, command...: retries until success or READY_TIMEOUT
  local what=$1; shift
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${READY_TIMEOUT}s waiting for $what"
    sleep 0.2
  done
}

for a in $REG_LISTEN $REG_ADMIN; do ! port_busy "${a%:*}" "${a#*:}" || die "$a is in use (a previous run still alive?)"; done
for v in $MESHD_VARIANTS; do
  [ -n "${CLIENT_IP[$v]:-}" ] || die "unknown MESHD_VARIANTS entry '$v' (pinned, default, http, http-quiet, http-trace1, http-trace100, http-base, http-alt, ingress, east-west)"
  if [ "$v" = http-base ]; then
    [ -x "${BASE_MESHD:-}" ] || die "MESHD_VARIANTS has http-base: set BASE_MESHD to an executable meshd binary"
  fi
  if [ "$v" = http-alt ]; then
    [ -x "${ALT_MESHD:-}" ] || die "MESHD_VARIANTS has http-alt: set ALT_MESHD to an executable meshd binary"
  fi
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

start_node() { # variant name ip gossip-seed-ip service-file-body [token-services [meshd.toml lines]]
  # (SITE and CLUSTER in the environment: the node's site and gossip cluster id)
  local v=$1 name=$2 ip=$3 seed=$4 svc=$5 dir="$TMP/$2" bin=${MESHD_BIN:-$BIN/meshd}
  [ "$v" = http-base ] && bin=$BASE_MESHD
  [ "$v" = http-alt ] && bin=$ALT_MESHD
  mkdir -p "$dir/services.d"
  cat >"$dir/node.toml" <<EOF
node_name = "$name"
${SITE:+site = \"$SITE\"}
data_dir = "data"
services_dir = "services.d"
[registry]
address = "$REG_LISTEN"
join_token_file = "token"
[gossip]
bind = "$ip:17946"
seeds = ["$seed:17946"]
cluster_id = "${CLUSTER:-bench-$v}"
[inbound]
bind = "$ip:15008"
[admin]
bind = "$ip:15000"
${OBSERVE[$v]:-}
${7:-}
EOF
  local svc_name=${6:-}
  if [ -n "$svc" ]; then
    printf '%s\n' "$svc" >"$dir/services.d/svc.toml"
    svc_name=$(sed -n 's/^name = "\(.*\)"/\1/p' <<<"$svc")
  fi
  token "$svc_name" >"$dir/token" || die "meshctl token create --services $svc_name failed"
  if [ "$v" != default ]; then
    local cpu=$PIN_CLIENT; [[ $name == server-* ]] && cpu=$PIN_SERVER
    (cd "$dir" && exec env TOKIO_WORKER_THREADS=1 taskset -c "$cpu" "$bin" run --config node.toml) >"$TMP/$name.log" 2>&1 &
  else
    (cd "$dir" && exec "$bin" run --config node.toml) >"$TMP/$name.log" 2>&1 &
  fi
  OUR_PIDS+=($!)
  MESHD_PIDS[$v]="${MESHD_PIDS[$v]:-} $!"
}

if [[ " $MESHD_VARIANTS " == *" http-trace"* ]]; then
  "$BIN/otlp-sink" --listen $OTLP >"$TMP/otlp-sink.log" 2>&1 &
  OTLP_PID=$!
  OUR_PIDS+=($OTLP_PID)
fi
start_east_west() { # the four nodes of the east-west variant
  local v=east-west ew
  head -c32 /dev/urandom | base64 >"$TMP/wan.key"
  printf '[[resource]]\nkind = "ServiceExport"\nname = "bench"\nservices = ["backend-%s"]\n' "$v" >"$TMP/export.toml"
  "$BIN/meshctl" --credentials "$TMP/registry/admin" apply -f "$TMP/export.toml" >>"$TMP/meshctl.log" 2>&1 ||
    die "applying the ServiceExport failed: $(tail -n 3 "$TMP/meshctl.log")"
  ew() { printf '[east_west]\nbind = "%s:15443"\nwan_bind = "%s:17947"\nwan_seeds = ["%s:17947"]\nwan_key_file = "%s"\n' "$1" "$1" "$2" "$TMP/wan.key"; }
  SITE=b CLUSTER=bench-ew-b start_node $v "server-$v" "${SERVER_IP[$v]}" $EW_GW_B "name = \"backend-$v\"
address = \"127.0.0.1:18080\"
protocol = \"http\""
  SITE=b CLUSTER=bench-ew-b start_node $v "gw-b-$v" $EW_GW_B "${SERVER_IP[$v]}" "" unused "$(ew $EW_GW_B $EW_GW_A)"
  SITE=a CLUSTER=bench-ew-a start_node $v "gw-a-$v" $EW_GW_A "${CLIENT_IP[$v]}" "" unused "$(ew $EW_GW_A $EW_GW_B)"
  SITE=a CLUSTER=bench-ew-a start_node $v "client-$v" "${CLIENT_IP[$v]}" $EW_GW_A "name = \"bench-client-$v\"
address = \"127.0.0.1:18999\"
[[upstreams]]
service = \"backend-$v\"
bind = \"127.0.0.1:${UP_PORT[$v]}\""
}

for v in $MESHD_VARIANTS; do
  if [ "$v" = east-west ]; then
    start_east_west
    continue
  fi
  proto=tcp; [[ $v == http* || $v == ingress ]] && proto=http
  start_node "$v" "server-$v" "${SERVER_IP[$v]}" "${CLIENT_IP[$v]}" "name = \"backend-$v\"
address = \"127.0.0.1:18080\"
protocol = \"$proto\""
  if [ "$v" = ingress ]; then
    start_node "$v" "client-$v" "${CLIENT_IP[$v]}" "${SERVER_IP[$v]}" "" edge \
      $'[gateway]\nnames = ["default/edge"]'
    continue
  fi
  start_node "$v" "client-$v" "${CLIENT_IP[$v]}" "${SERVER_IP[$v]}" "name = \"bench-client-$v\"
address = \"127.0.0.1:18999\"
[[upstreams]]
service = \"backend-$v\"
bind = \"127.0.0.1:${UP_PORT[$v]}\""
done

# --- HTTPS ingress: meshd's gateway, and HAProxy and nginx terminating the same TLS ----------
declare -A SCHEME=()
EDGE_NAME=edge.bench
if [[ " $MESHD_VARIANTS " == *" ingress "* ]]; then
  # A server certificate for the edge from the peers' CA (throwaway, like theirs).
  openssl ecparam -name prime256v1 -genkey -noout -out "$TMP/edge.key" 2>/dev/null
  openssl req -new -key "$TMP/edge.key" -subj "/CN=$EDGE_NAME" -out "$TMP/edge.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:%s\n' \
    "$EDGE_NAME" >"$TMP/edge.ext"
  openssl x509 -req -in "$TMP/edge.csr" -CA "$RUN/certs/ca.crt" -CAkey "$RUN/certs/ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$TMP/edge.ext" -out "$TMP/edge.crt" 2>/dev/null || die "cannot issue the edge certificate"
  cat "$TMP/edge.crt" "$TMP/edge.key" >"$TMP/edge.pem"
  cat >"$TMP/ingress.toml" <<EOF
[[resource]]
kind = "Gateway"
name = "edge"
[[resource.listeners]]
name = "https"
bind = "127.0.0.1:${UP_PORT[ingress]}"
protocol = "https"
tls = { certificates = [{ cert_file = "$TMP/edge.crt", key_file = "$TMP/edge.key" }], min_version = "1.3" }
[[resource]]
kind = "Route"
name = "edge"
gateways = ["edge"]
[[resource.http]]
route = [{ service = "backend-ingress" }]
EOF
  "$BIN/meshctl" --credentials "$TMP/registry/admin" apply -f "$TMP/ingress.toml" >>"$TMP/meshctl.log" 2>&1 ||
    die "applying the ingress Gateway failed: $(tail -n 3 "$TMP/meshctl.log")"
  # The peers' client-side configs with the plain listener swapped for the same HTTPS one.
  sed -e "s#bind 127.0.0.1:18001 backlog 4096#bind 127.0.0.1:18021 backlog 4096 ssl crt $TMP/edge.pem alpn http/1.1 ssl-min-ver TLSv1.3#" \
    -e "s#pidfile .*#pidfile $TMP/haproxy-ingress.pid#" "$RUN/conf/haproxy-client.cfg" >"$TMP/haproxy-ingress.cfg"
  sed -e "s#listen 127.0.0.1:18002 backlog=4096;#listen 127.0.0.1:18022 ssl backlog=4096; ssl_certificate $TMP/edge.crt; ssl_certificate_key $TMP/edge.key; ssl_protocols TLSv1.3;#" \
    -e "s#^pid .*#pid $TMP/nginx-ingress.pid;#" -e "s#error_log .*#error_log $TMP/nginx-ingress.err warn;#" \
    "$RUN/conf/nginx-client.conf" >"$TMP/nginx-ingress.conf"
  grep -q 18021 "$TMP/haproxy-ingress.cfg" && grep -q 18022 "$TMP/nginx-ingress.conf" ||
    die "the peers' client configs changed shape; update the ingress sed lines in bench/run.sh"
  haproxy -D -q -f "$TMP/haproxy-ingress.cfg" || die "haproxy-ingress failed to start"
  nginx -c "$TMP/nginx-ingress.conf" -p "$TMP/" -e "$TMP/nginx-ingress.err" || die "nginx-ingress failed to start"
  sleep 0.3
  OUR_PIDS+=("$(cat "$TMP/haproxy-ingress.pid")" "$(cat "$TMP/nginx-ingress.pid")")
  SCHEME=([meshd-ingress]=https [haproxy-ingress]=https [nginx-ingress]=https)
fi
e2e_ok() { # port [target]: GET /1k answers 200 with the whole body
  local t=${2:-} args=()
  if [ "${SCHEME[$t]:-http}" = https ]; then
    args=(--cacert "$RUN/certs/ca.crt" --resolve "$EDGE_NAME:$1:127.0.0.1" "https://$EDGE_NAME:$1/1k")
  else
    args=("http://127.0.0.1:$1/1k")
  fi
  [ "$(curl -s -o /dev/null -w '%{http_code}:%{size_download}' "${args[@]}")" = "200:$BODY_LEN" ]
}
for v in $MESHD_VARIANTS; do
  for ip in "${CLIENT_IP[$v]}" "${SERVER_IP[$v]}"; do
    wait_for "meshd at $ip to be ready (http://$ip:15000/ready)" curl -fsS "http://$ip:15000/ready"
  done
  wait_for "gossip to show backend-$v to client-$v" \
    bash -c "curl -fsS http://${CLIENT_IP[$v]}:15000/members | grep -q 'backend-$v\"'"
  wait_for "GET /1k through meshd ($v, 127.0.0.1:${UP_PORT[$v]})" e2e_ok "${UP_PORT[$v]}" "meshd-$v"
  for p in ${MESHD_PIDS[$v]}; do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = meshd ] || die "pid $p is not meshd (taskset/env did not exec?)"
  done
done

# --- targets ---------------------------------------------------------------------------------
declare -A PORT=([direct]=18080 [haproxy]=18001 [nginx]=18002 [haproxy-l4]=18003
  [haproxy-ingress]=18021 [nginx-ingress]=18022)
DEFAULT_TARGETS="direct"
for v in $MESHD_VARIANTS; do PORT[meshd-$v]=${UP_PORT[$v]}; DEFAULT_TARGETS+=" meshd-$v"; done
DEFAULT_TARGETS+=" haproxy nginx haproxy-l4"
if [[ " $MESHD_VARIANTS " == *" ingress "* ]]; then
  DEFAULT_TARGETS+=" haproxy-ingress nginx-ingress"
  for t in haproxy-ingress nginx-ingress; do wait_for "GET /1k through $t" e2e_ok "${PORT[$t]}" "$t"; done
fi
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
for t in $TARGETS; do [ -n "${PORT[$t]:-}" ] || die "unknown target '$t' (known: $DEFAULT_TARGETS)"; done

pids_of() { # the processes whose CPU and memory a target is charged with
  case $1 in
    meshd-*) echo ${MESHD_PIDS[${1#meshd-}]} ;;
    # The HTTPS front and the peer's own server side (the one its mTLS pair uses).
    haproxy-ingress) cat "$TMP/haproxy-ingress.pid" "$RUN/haproxy-server.pid" ;;
    nginx-ingress)
      for p in "$(cat "$TMP/nginx-ingress.pid")" "$(cat "$RUN/nginx-server.pid")"; do echo "$p"; pgrep -P "$p"; done ;;
    *) bash "$PEERS" pids "$1" ;;
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
rss_kb() { local sum=0 p; for p in "$@"; do sum=$((sum + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status"))); done; echo $sum; }
HZ=$(getconf CLK_TCK)

machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# This shell plus every child it has waited for (wrk, mesh-bench, curl, awk...).
self_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $12 + $13 + $14 + $15}'; }
BACKEND_PIDS=$(bash "$PEERS" pids direct | tr '\n' ' ')

RAW="$TMP/raw.tsv"
printf 'round\ttarget\treq_per_s\trequests\tcpu_s\tcpu_s_per_1k\trss_kb\tp50_us\tp99_us\tp999_us\twrk_errors\tlat_errors\tother_vcpu\n' >"$RAW"

measure() { # round target
  local r=$1 t=$2 port=${PORT[$2]} pids known out rps reqs werr c0 c1 rss lat m0 s0 k0 w0 other
  pids=$(pids_of "$t" | tr '\n' ' ')
  known=$(echo $pids $BACKEND_PIDS | tr ' ' '\n' | sort -u | tr '\n' ' ')
  m0=$(machine_busy); s0=$(self_ticks); k0=$(cpu_ticks $known); w0=$EPOCHREALTIME
  c0=$(cpu_ticks $pids)
  # wrk verifies no certificate; for HTTPS targets it connects to the loopback address.
  out=$(wrk -t1 -c32 -d"$DURATION" "${SCHEME[$t]:-http}://127.0.0.1:$port/1k") || die "wrk failed on $t"
  c1=$(cpu_ticks $pids)
  rss=$(rss_kb $pids)
  sleep 0.2   # let the closed wrk connections drain through the proxies
  local tls=()
  [ "${SCHEME[$t]:-http}" = https ] && tls=(--tls-ca "$RUN/certs/ca.crt" --tls-name "$EDGE_NAME")
  lat=$("$BIN/mesh-bench" --addr "127.0.0.1:$port" --path /1k --rate "$RATE" --connections "$LAT_CONNS" \
    --duration "$LAT_DURATION" --expect-len $BODY_LEN "${tls[@]}") || die "mesh-bench failed on $t"
  # CPU used during both runs by anything other than this script, its children, the target and
  # the backend: the shared machine's background noise, in average vCPUs.
  other=$(awk -v m=$(($(machine_busy) - m0)) -v s=$(($(self_ticks) - s0)) -v k=$(($(cpu_ticks $known) - k0)) \
    -v hz="$HZ" -v w="$(awk -v a="$w0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" \
    'BEGIN {o = (m - s - k) / hz / w; printf "%.2f", o < 0 ? 0 : o}')
  echo "$lat" >>"$TMP/latency.jsonl"
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  reqs=$(awk '/ requests in / {print $1}' <<<"$out")
  werr=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
  j() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" <<<"$lat"; }
  awk -v r="$r" -v t="$t" -v rps="$rps" -v reqs="$reqs" -v dt=$((c1 - c0)) -v hz="$HZ" -v rss="$rss" \
    -v p50="$(j p50_us)" -v p99="$(j p99_us)" -v p999="$(j p999_us)" -v we="$werr" \
    -v le="$(($(j errors) + $(j unsent)))" -v other="$other" 'BEGIN {
      cpu = dt / hz
      printf "%s\t%s\t%.0f\t%d\t%.2f\t%.4f\t%d\t%s\t%s\t%s\t%d\t%d\t%s\n", r, t, rps, reqs, cpu, cpu / (reqs / 1000), rss, p50, p99, p999, we, le, other
    }' | tee -a "$RAW" >&2
}

if [ "${HOLD:-0}" = 1 ]; then   # set up, then wait: for profiling by hand (perf, strace)
  for t in $TARGETS; do log "$t: http://127.0.0.1:${PORT[$t]}/1k  pids: $(pids_of "$t" | tr '\n' ' ')"; done
  log "HOLD=1: everything is up; Ctrl-C (or kill $$) to clean up"
  trap 'exit 0' INT TERM
  while :; do sleep 1; done
fi

log "measuring: $ROUNDS rounds of [$TARGETS], saturation $DURATION + latency $LAT_DURATION at $RATE req/s each"
for r in $(seq "$ROUNDS"); do
  for t in $TARGETS; do measure "$r" "$t"; done
done

# --- report ----------------------------------------------------------------------------------
col() { awk -F'\t' -v t="$1" -v c="$2" 'NR > 1 && $2 == t {print $c}' "$RAW"; }
median() { sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
range() { sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.0f–%.0fk", lo / 1000, hi / 1000}'; }
declare -A MED=()
for t in $TARGETS; do
  for c in 3 6 7 8 9 10 11 12; do MED[$t,$c]=$(col "$t" $c | median); done
  MED[$t,range]=$(col "$t" 3 | range)
done
ref=direct; [[ " $TARGETS " == *" direct "* ]] || ref=""

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
OUT="$RESULTS/$STAMP.md"
{
  echo "# bench/run.sh — $STAMP"
  echo
  echo "git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)'), meshd binary ${MESHD_BIN:-$BIN/meshd} built $(date -u -r "${MESHD_BIN:-$BIN/meshd}" +%FT%TZ)${BASE_MESHD:+, http-base: $BASE_MESHD}${ALT_MESHD:+, http-alt: $ALT_MESHD}; $(nproc) vCPU; kernel $(uname -r); $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)"
  echo "Medians of $ROUNDS rounds. Saturation: wrk -t1 -c32 -d$DURATION /1k. Latency: mesh-bench open loop, $RATE req/s over $LAT_CONNS keep-alive connections for $LAT_DURATION, from the intended send time. CPU and RSS: the target's proxy processes (direct: the nginx backend)."
  echo "meshd-pinned: each meshd with TOKIO_WORKER_THREADS=1 under taskset (client side on CPU $PIN_CLIENT, server side on CPU $PIN_SERVER); meshd-default: tokio's default runtime (one worker per CPU), unpinned; meshd-http: as meshd-pinned with the backend declared protocol = \"http\" (each request proxied, HTTP/2 between the hosts). The peers run one thread/worker each, unpinned."
  echo "Background: other processes used $(awk -F'\t' 'NR > 1 {print $13}' "$RAW" | median | xargs printf %.2f) vCPU (median; max $(awk -F'\t' 'NR > 1 {print $13}' "$RAW" | sort -g | tail -n1)) while targets were measured; wall time $((SECONDS / 60))m$((SECONDS % 60))s."
  echo
  echo "| target | req/s at saturation (× direct) | req/s range | p50 / p99 / p99.9 at $RATE req/s, µs | added p50 / p99 vs direct, µs | vCPU·s per 1k req (× direct) | RSS, MB | errors |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for t in $TARGETS; do
    awk -v t="$t" -v rps="${MED[$t,3]}" -v rng="${MED[$t,range]}" -v cpu="${MED[$t,6]}" -v rss="${MED[$t,7]}" \
      -v p50="${MED[$t,8]}" -v p99="${MED[$t,9]}" -v p999="${MED[$t,10]}" \
      -v errs="$(col "$t" 11 | awk '{n += $1} END {print n + 0}')/$(col "$t" 12 | awk '{n += $1} END {print n + 0}')" \
      -v drps="${ref:+${MED[$ref,3]}}" -v dcpu="${ref:+${MED[$ref,6]}}" -v d50="${ref:+${MED[$ref,8]}}" -v d99="${ref:+${MED[$ref,9]}}" 'BEGIN {
        ratio = (drps > 0) ? sprintf(" (%.2f)", rps / drps) : ""
        cratio = (dcpu > 0) ? sprintf(" (%.1f)", cpu / dcpu) : ""
        added = (d50 == "" || t == "direct") ? "—" : sprintf("%+.0f / %+.0f", p50 - d50, p99 - d99)
        printf "| %s | %.1fk%s | %s | %.0f / %.0f / %.0f | %s | %.3f%s | %.1f | %s |\n", t, rps / 1000, ratio, rng, p50, p99, p999, added, cpu, cratio, rss / 1024, errs
      }'
  done
  echo
  echo "errors: wrk non-2xx + socket errors / mesh-bench failed or unsent requests, summed over rounds."
  awk -F'\t' 'NR > 1 && ($11 + $12) > 0 {e = 1} END {if (e) print "\n**WARNING: some requests failed; see the per-round table and latency.jsonl (first_error).**"}' "$RAW"
  awk -F'\t' 'NR > 1 && $13 > 0.25 {n++} END {if (n) printf "\n**WARNING: %d measurement(s) ran while other processes used more than 0.25 vCPU (other_vcpu); consider a rerun on a quiet machine.**\n", n}' "$RAW"
  echo
  echo "Per round:"
  echo
  echo '```'
  column -t -s $'\t' "$RAW" 2>/dev/null || cat "$RAW"
  echo '```'
} >"$OUT"
cp "$TMP/latency.jsonl" "$RESULTS/$STAMP.latency.jsonl"
cat "$OUT"
log "written to ${OUT#"$ROOT"/}"
