#!/usr/bin/env bash
# Proves the Ansible roles on real Debian roots: lints ansible/, then applies site.yml with the
# community.general.chroot connection to two fresh Debian bookworm roots (a registry host and a
# meshd host), installing the .debs that packaging/build.sh wrote to
# $CARGO_TARGET_DIR/packages (default target/packages), and checks:
#
#  - ansible-lint (production profile) passes with no rule skipped;
#  - packages installed (dpkg), the mesh created once (mesh-registry init as its user),
#    registry.toml, meshd.toml, the service files and the join token rendered with the expected
#    content, owner and mode, and accepted by the installed binaries' check-config;
#    meshd_services_absent and meshd_services_exclusive remove what they should;
#  - a second run changes nothing (changed=0 on every host);
#  - a bad value is refused by the template's validate: step (the installed binary's
#    check-config) and the live file stays as it was: meshd_gossip_interval out of range, an
#    admin bind off loopback without meshd_admin_allow_remote (accepted, with a warning, with
#    it), a service whose upstream bind is not an address, a service whose upstream bind
#    clashes with another service file's, a registry duration that is not one;
#  - argument_specs refuse a wrongly typed variable, an unknown choice and a service without its
#    required key before any task runs; the registry role refuses to change the trust domain;
#  - service management, against a stand-in systemctl (no systemd runs in the roots, nor on this
#    machine) that records what it is asked, and a /ready answered on loopback: a config change
#    starts a stopped unit; a change of reloadable settings or service files reloads a running
#    meshd whose unit can reload (CanReload=yes); a change of a setting meshd only takes at
#    start, a unit that cannot reload, or meshd_config_change_action=restart restarts it; an
#    upgrade restarts once and does not reload; reruns do nothing; the roles wait for /ready.
#
# The main plays run with meshd_manage_service=false and mesh_registry_manage_service=false, as
# on a host without systemd. Not covered: real systemd, a real meshd answering /ready, meshd
# applying a reload (SIGHUP) itself.
#
# The roots come from the same cached debootstrap tarball as packaging/test-deb.sh
# ($out/bookworm-minbase.tar.zst, created here the same way when missing). Python, which
# Ansible needs on the target, is installed into them with apt; its .debs are kept in
# $target/ansible-test-cache so that later runs need no network. Ansible and ansible-lint are
# pip-installed, pinned, into $target/ansible-venv (rebuilt when the pins change).
# Needs root (chroot, mount), network to PyPI and the Debian mirror on a first run.
#
# Usage: ansible/test.sh        (exit status 0 only if every check passed)
set -euo pipefail

# Pins: the newest releases that install on Python 3.11 (ansible 12 needs Python >= 3.11 on the
# controller). The full ansible package, not only ansible-core: it carries community.general,
# whose chroot connection plugin this test uses.
ANSIBLE_VERSION=12.3.0
ANSIBLE_CORE_VERSION=2.19.14
ANSIBLE_LINT_VERSION=26.10.1

SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}

top=$(cd "$(dirname "$0")/.." && pwd)
here=$top/ansible
target=${CARGO_TARGET_DIR:-$top/target}
out=$target/packages
cache=$out/$SUITE-minbase.tar.zst
venv=$target/ansible-venv
debcache=$target/ansible-test-cache/archives

say() { printf '\n== %s\n' "$*"; }
die() { echo "ansible/test.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (chroot, mount)"
meshd_deb=$(ls "$out"/meshd_*_amd64.deb 2>/dev/null | head -n1) || true
registry_deb=$(ls "$out"/mesh-registry_*_amd64.deb 2>/dev/null | head -n1) || true
[ -n "$meshd_deb" ] && [ -n "$registry_deb" ] || die "no debs in $out: run packaging/build.sh first"

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/ansible-test.XXXXXX")
RR=$work/registry
RN=$work/node
logs=$work/logs
mkdir -p "$logs"

cleanup() {
  local rc=$?
  set +e
  local r p
  [ -z "${ready_pid:-}" ] || kill "$ready_pid" 2>/dev/null
  for r in "$RR" "$RN"; do
    # Anything still running inside a root was started by this script.
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/root" 2>/dev/null)" = "$r" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    mountpoint -q "$r/proc" && umount "$r/proc"
  done
  # The plays' output, for a look after the run.
  if [ -d "$logs" ]; then
    rm -rf "$target/ansible-test-logs"
    cp -r "$logs" "$target/ansible-test-logs"
  fi
  # Never rm -rf through a live mount.
  if grep -qF " $work/" /proc/mounts; then
    echo "ansible/test.sh: mounts left under $work, not deleting it:" >&2
    grep -F " $work/" /proc/mounts >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- checks ---------------------------------------------------------------------------------
passed=0
failed=()
results=()
ok() { passed=$((passed + 1)); results+=("PASS  $1"); echo "PASS: $1"; }
ko() { failed+=("$1"); results+=("FAIL  $1"); echo "FAIL: $1" >&2; }
# check "description" command...: runs the command on the host.
check() { local d=$1; shift; if "$@"; then ok "$d"; else ko "$d"; fi; }
# eq "description" actual expected
eq() { if [ "$2" = "$3" ]; then ok "$1"; else ko "$1 (got '$2', want '$3')"; fi; }
# Runs a command in root $1, non-interactively, stdin closed.
inr() {
  local r=$1
  shift
  chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C HOME=/root \
    DEBIAN_FRONTEND=noninteractive "$@" </dev/null
}
stat_of() { inr "$1" stat -c '%U:%G %a' "$2" 2>/dev/null || echo missing; }
# has "description" file line: the file (host path) holds this exact line.
has() { if grep -qxF -- "$3" "$2" 2>/dev/null; then ok "$1"; else ko "$1 (no line '$3' in ${2#"$work"/})"; fi; }

# --- ansible and ansible-lint ---------------------------------------------------------------
say "ansible $ANSIBLE_VERSION (core $ANSIBLE_CORE_VERSION), ansible-lint $ANSIBLE_LINT_VERSION in $venv"
pins="ansible==$ANSIBLE_VERSION ansible-core==$ANSIBLE_CORE_VERSION ansible-lint==$ANSIBLE_LINT_VERSION"
if [ "$(cat "$venv/.pins" 2>/dev/null || true)" != "$pins" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # $pins is a list of requirement words
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
  echo "$pins" >"$venv/.pins"
else
  echo "cached"
fi
export PATH=$venv/bin:$PATH
# The first line, without a pipe into head: that can end ansible with EPIPE.
ansible_version=$(ansible-playbook --version)
ansible_version=${ansible_version%%$'\n'*}
echo "$ansible_version"

say "ansible-lint"
# --offline: no collection or schema downloads (the venv's ansible package has what the roles
# use). The profile (production) and the absence of skips are in ansible/.ansible-lint.
if (cd "$here" && ansible-lint --offline --nocolor) >"$logs/lint.txt" 2>&1; then
  ok "ansible-lint (profile production): $(tail -n1 "$logs/lint.txt")"
else
  cat "$logs/lint.txt" >&2
  ko "ansible-lint (profile production)"
fi

# --- the Debian roots ------------------------------------------------------------------------
if [ ! -s "$cache" ]; then
  # As in packaging/test-deb.sh, which uses the same cache.
  say "debootstrap $SUITE (no cache at $cache)"
  if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
  fi
  b=$work/bootstrap
  debootstrap --variant=minbase "$SUITE" "$b" "$MIRROR"
  cp /etc/resolv.conf "$b/etc/resolv.conf"
  chroot "$b" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C apt-get -q update
  chroot "$b" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C apt-get clean
  rm -f "$b/etc/resolv.conf"
  mkdir -p "$out"
  tar --numeric-owner --zstd -C "$b" -cf "$cache.tmp" .
  mv "$cache.tmp" "$cache"
  rm -rf "$b"
fi

say "two roots from $cache, with python3 and python3-apt"
mkdir "$RR"
tar --numeric-owner --zstd -C "$RR" -xpf "$cache"
cp /etc/resolv.conf "$RR/etc/resolv.conf"
mount -t proc proc "$RR/proc"
# Ansible's modules run on python3; its apt module needs python3-apt. From the .deb cache
# when it has them (the cached package lists still name them), else from the mirror.
mkdir -p "$debcache"
find "$debcache" -name '*.deb' -exec cp -t "$RR/var/cache/apt/archives/" {} +
APT=(apt-get -q -y -o Dpkg::Use-Pty=0 --no-install-recommends)
if ! inr "$RR" "${APT[@]}" install python3 python3-apt >"$logs/apt.txt" 2>&1; then
  # The cached lists are older than the mirror: refresh them and try again.
  inr "$RR" apt-get -q update >>"$logs/apt.txt" 2>&1 || true
  inr "$RR" "${APT[@]}" install python3 python3-apt >>"$logs/apt.txt" 2>&1 \
    || { cat "$logs/apt.txt" >&2; die "could not install python3 in the root"; }
fi
find "$RR/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -exec cp -t "$debcache/" {} +
inr "$RR" apt-get clean
echo "python3 $(inr "$RR" python3 -c 'import platform; print(platform.python_version())'), .deb cache: $(find "$debcache" -name '*.deb' | wc -l) files"
umount "$RR/proc"
# The second root is a copy of the first, python included.
cp -a "$RR" "$RN"
mount -t proc proc "$RR/proc"
mount -t proc proc "$RN/proc"

# A service file that was on the node before Ansible (meshd_services_absent removes it) and one
# placed by hand (kept, until meshd_services_exclusive).
mkdir -p "$RN/etc/meshd/services.d"
printf 'name = "old"\naddress = "127.0.0.1:8070"\n' >"$RN/etc/meshd/services.d/old.toml"
printf 'name = "stray"\naddress = "127.0.0.1:8071"\n' >"$RN/etc/meshd/services.d/stray.toml"

# --- inventory -------------------------------------------------------------------------------
# Does the packaged meshd have `check-config --service` (the role's validate: for service
# files)? Debs built before it refuse every service file: that fails this test, and the service
# files are left out of the plays so that the other checks still run.
if dpkg-deb --fsys-tarfile "$meshd_deb" | tar -xO ./usr/bin/meshd >"$work/meshd-bin" \
  && chmod +x "$work/meshd-bin" && "$work/meshd-bin" check-config --help 2>/dev/null | grep -q -- '--service'; then
  services_supported=yes
else
  services_supported=no
fi
rm -f "$work/meshd-bin"

token="K7hQ-test-join-token.not-a-real-one"
inv=$work/inventory.yml
cat >"$inv" <<EOF
all:
  vars:
    ansible_connection: community.general.chroot
    ansible_python_interpreter: /usr/bin/python3
    # Already root in a chroot, and the roots have no sudo: site.yml's become: true is undone.
    ansible_become: false
  children:
    mesh_registry:
      hosts:
        registry:
          ansible_host: $RR
      vars:
        mesh_registry_package_file: $registry_deb
        mesh_registry_manage_service: false
        mesh_registry_trust_domain: mesh.test
        mesh_registry_advertise: [registry.test:7700]
        mesh_registry_workload_cert_ttl: 12h
    meshd:
      hosts:
        node1:
          ansible_host: $RN
      vars:
        meshd_package_file: $meshd_deb
        meshd_manage_service: false
        meshd_registry_address: registry.test:7700
        # Only written into the config (documentation range address; nothing is sent to it).
        meshd_advertise_address: 192.0.2.10
        meshd_gossip_seeds: [192.0.2.11:7946, seed.test:7946]
        meshd_zone: zone-a
        meshd_join_token: $token
        meshd_services_absent: [old]
EOF
if [ "$services_supported" = yes ]; then
  cat >>"$inv" <<'EOF'
        meshd_services:
          - name: web
            address: 127.0.0.1:8080
            protocol: http
            labels: {version: v1, app.kubernetes.io: web}
            upstreams:
              - {service: api, bind: 127.0.0.1:9001}
              - {service: payments/checkout, bind: 127.0.0.1:9002}
            checks:
              - {http: /healthz, expect_status: 200-399, interval: 10s, timeout: 1s, unhealthy_threshold: 3}
              - {tcp: true}
          - name: api
            address: 127.0.0.1:8081
            protocol: grpc
EOF
fi

# play NAME [ansible-playbook args...]: runs site.yml, output in $logs/NAME.txt; returns its status.
play() {
  local name=$1
  shift
  ANSIBLE_NOCOLOR=1 ANSIBLE_LOCAL_TEMP=$work/ansible-local ANSIBLE_RETRY_FILES_ENABLED=0 \
    ansible-playbook -i "$inv" "$here/site.yml" "$@" >"$logs/$name.txt" 2>&1
}
# recap NAME HOST: the PLAY RECAP line of HOST in run NAME.
recap() { grep -E "^$2 +: " "$logs/$1.txt" | tail -n1 | tr -s ' '; }
show() { echo "---- $1 (last 40 lines)"; tail -n 40 "$logs/$1.txt"; echo "----"; }

# --- first run ---------------------------------------------------------------------------------
say "site.yml, first run"
if play first; then ok "first run succeeds"; else ko "first run succeeds"; show first; fi
echo "recap: $(recap first registry) / $(recap first node1)"
check "first run: registry and node1 failed=0" \
  sh -c "grep -Eq '^registry +: .*failed=0' '$logs/first.txt' && grep -Eq '^node1 +: .*failed=0' '$logs/first.txt'"
check "first run: argument specs validated for both roles" \
  sh -c "[ \$(grep -c 'Validating arguments against arg spec' '$logs/first.txt') -ge 2 ]"

say "registry host"
eq "mesh-registry: dpkg status" "$(inr "$RR" dpkg-query -W -f '${Status} ${Version}' mesh-registry 2>/dev/null || true)" \
  "install ok installed $(dpkg-deb -f "$registry_deb" Version)"
check "mesh-registry: the .deb was copied to the host" test -f "$RR/var/cache/ansible-mesh-registry/$(basename "$registry_deb")"
check "mesh-registry init ran (CA and operator credentials exist)" \
  test -s "$RR/var/lib/mesh-registry/admin/meshctl.toml" -a -s "$RR/var/lib/mesh-registry/admin/admin-key.pem"
eq "mesh-registry: init ran as mesh-registry (admin key owner and mode)" \
  "$(stat_of "$RR" /var/lib/mesh-registry/admin/admin-key.pem)" "mesh-registry:mesh-registry 600"
rc=$RR/var/lib/mesh-registry/registry.toml
eq "registry.toml: owner and mode" "$(stat_of "$RR" /var/lib/mesh-registry/registry.toml)" "root:mesh-registry 640"
has "registry.toml: trust_domain" "$rc" 'trust_domain = "mesh.test"'
has "registry.toml: data_dir" "$rc" 'data_dir = "/var/lib/mesh-registry"'
has "registry.toml: listen" "$rc" 'listen = "0.0.0.0:7700"'
has "registry.toml: advertise" "$rc" 'advertise = ["registry.test:7700"]'
has "registry.toml: workload_cert_ttl from the inventory" "$rc" 'workload_cert_ttl = "12h"'
check "registry.toml: mesh-registry check-config accepts it" \
  inr "$RR" mesh-registry check-config --config /var/lib/mesh-registry/registry.toml

say "meshd host"
eq "meshd: dpkg status" "$(inr "$RN" dpkg-query -W -f '${Status} ${Version}' meshd 2>/dev/null || true)" \
  "install ok installed $(dpkg-deb -f "$meshd_deb" Version)"
mc=$RN/etc/meshd/meshd.toml
eq "meshd.toml: owner and mode" "$(stat_of "$RN" /etc/meshd/meshd.toml)" "root:meshd 640"
has "meshd.toml: node_name (inventory hostname)" "$mc" 'node_name = "node1"'
has "meshd.toml: zone" "$mc" 'zone = "zone-a"'
has "meshd.toml: registry.address" "$mc" 'address = "registry.test:7700"'
has "meshd.toml: gossip.bind" "$mc" 'bind = "0.0.0.0:7946"'
has "meshd.toml: gossip.advertise (from meshd_advertise_address)" "$mc" 'advertise = "192.0.2.10:7946"'
has "meshd.toml: inbound.advertise (from meshd_advertise_address)" "$mc" 'advertise = "192.0.2.10:15008"'
has "meshd.toml: gossip.seeds" "$mc" 'seeds = ["192.0.2.11:7946", "seed.test:7946"]'
has "meshd.toml: max_connections is an integer" "$mc" 'max_connections = 10000'
check "meshd.toml: no cluster_id (empty variable)" sh -c "! grep -q '^cluster_id' '$mc'"
check "meshd.toml: no allow_remote (meshd_admin_allow_remote false)" sh -c "! grep -q '^allow_remote' '$mc'"
check "meshd.toml: meshd check-config accepts it" inr "$RN" meshd check-config --config /etc/meshd/meshd.toml
tok=$RN/etc/meshd/join-token
eq "join-token: content" "$(cat "$tok" 2>/dev/null || true)" "$token"
eq "join-token: owner and mode" "$(stat_of "$RN" /etc/meshd/join-token)" "root:meshd 640"
check "join-token: not in the play's output (no_log)" sh -c "! grep -qF '$token' '$logs/first.txt'"
check "meshd_services_absent: old.toml removed" test ! -e "$RN/etc/meshd/services.d/old.toml"
check "a service file not in meshd_services is kept (exclusive off)" test -e "$RN/etc/meshd/services.d/stray.toml"
if [ "$services_supported" = yes ]; then
  wc=$RN/etc/meshd/services.d/web.toml
  eq "web.toml: owner and mode" "$(stat_of "$RN" /etc/meshd/services.d/web.toml)" "root:meshd 640"
  has "web.toml: name" "$wc" 'name = "web"'
  has "web.toml: protocol" "$wc" 'protocol = "http"'
  has "web.toml: label with dots, quoted" "$wc" '"app.kubernetes.io" = "web"'
  has "web.toml: upstream bind" "$wc" 'bind = "127.0.0.1:9002"'
  has "web.toml: check, integer" "$wc" 'unhealthy_threshold = 3'
  has "web.toml: check, boolean" "$wc" 'tcp = true'
  check "api.toml rendered" test -s "$RN/etc/meshd/services.d/api.toml"
  out_cc=$(inr "$RN" meshd check-config --config /etc/meshd/meshd.toml 2>&1 || true)
  check "meshd check-config counts web, api and stray ($out_cc)" grep -q '3 service(s)' <<<"$out_cc"
else
  ko "the packaged meshd has check-config --service (rebuild the debs: packaging/build.sh); service files not checked"
fi

# --- second run: idempotent -----------------------------------------------------------------------
say "site.yml, second run (idempotence)"
if play second; then ok "second run succeeds"; else ko "second run succeeds"; show second; fi
echo "recap: $(recap second registry) / $(recap second node1)"
check "second run: changed=0 on registry and node1" \
  sh -c "grep -Eq '^registry +: .*changed=0 .*failed=0' '$logs/second.txt' && grep -Eq '^node1 +: .*changed=0 .*failed=0' '$logs/second.txt'"
if ! grep -Eq '^(registry|node1) +: .*changed=0 ' "$logs/second.txt"; then grep -E '^changed:' "$logs/second.txt" >&2 || true; fi

# --- refused values: the live files stay ---------------------------------------------------------
sum() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
mc_sum=$(sum "$mc")
rc_sum=$(sum "$rc")

# failure_message LOG: the message of the first failed task in LOG (from its JSON result).
failure_message() {
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.startswith(("fatal:", "failed:")) and " => " in line:
        r = json.loads(line.split(" => ", 1)[1])
        print("\n".join(r.get("stderr_lines") or r.get("argument_errors") or [r.get("msg", "")]))
        break
' "$1"
}

# refused NAME TASK PATTERN ARGS...: the run fails, at the task named TASK, with PATTERN in its
# output.
refused() {
  local name=$1 task=$2 pattern=$3
  shift 3
  if play "$name" "$@"; then
    ko "$name: the play fails"
    show "$name"
    return
  fi
  # The last "TASK [...]" header before the failure is the failing task.
  local at
  at=$(awk '/^TASK \[/ { t = $0 } /^(fatal|failed):/ { print t; exit }' "$logs/$name.txt")
  if [[ $at == *"$task"* ]] && grep -qE -- "$pattern" "$logs/$name.txt"; then
    ok "$name: refused at '$task' (${pattern//\\/})"
    # What the operator reads: check-config's stderr, the argument errors or the message.
    failure_message "$logs/$name.txt" | sed 's/^/      /' || true
  else
    ko "$name: refused at '$task' with /$pattern/ (failed at: ${at:-nowhere})"
    show "$name"
  fi
}

say "refused: meshd_gossip_interval out of range"
refused bad-interval "Render the node config" 'gossip\.interval.*out of range' --limit node1 -e meshd_gossip_interval=1h
eq "bad-interval: meshd.toml unchanged" "$(sum "$mc")" "$mc_sum"

say "refused: an admin bind off loopback without meshd_admin_allow_remote"
refused admin-remote "Render the node config" 'admin\.allow_remote = true' --limit node1 \
  -e meshd_admin_bind=0.0.0.0:15000
eq "admin-remote: meshd.toml unchanged" "$(sum "$mc")" "$mc_sum"

say "refused: argument_specs"
refused bad-type "Validating arguments against arg spec" 'meshd_inbound_max_connections' \
  --limit node1 -e '{"meshd_inbound_max_connections": "lots"}'
refused bad-service-spec "Validating arguments against arg spec" 'address' \
  --limit node1 -e '{"meshd_services": [{"name": "nowhere"}]}'
refused bad-choice "Validating arguments against arg spec" 'meshd_config_change_action' \
  --limit node1 -e meshd_config_change_action=bounce
eq "argument specs: meshd.toml unchanged" "$(sum "$mc")" "$mc_sum"
check "argument specs: no service file nowhere.toml" test ! -e "$RN/etc/meshd/services.d/nowhere.toml"

if [ "$services_supported" = yes ]; then
  wc_sum=$(sum "$wc")
  say "refused: a service with an invalid upstream bind"
  refused bad-upstream "Render the service files" 'upstreams\[0\]\.bind' --limit node1 \
    -e '{"meshd_services": [{"name": "web", "address": "127.0.0.1:8080", "upstreams": [{"service": "api", "bind": "127.0.0.1:notaport"}]}]}'
  eq "bad-upstream: web.toml unchanged" "$(sum "$wc")" "$wc_sum"

  say "refused: a service whose upstream bind clashes with another service file's"
  # web.toml (on the host) already binds 127.0.0.1:9001; the new file is valid on its own.
  refused clash "Render the service files" '127\.0\.0\.1:9001' --limit node1 \
    -e '{"meshd_services": [{"name": "clash", "address": "127.0.0.1:8090", "upstreams": [{"service": "api", "bind": "127.0.0.1:9001"}]}]}'
  check "clash: no clash.toml" test ! -e "$RN/etc/meshd/services.d/clash.toml"
  eq "clash: web.toml unchanged" "$(sum "$wc")" "$wc_sum"
fi

say "refused: registry values"
refused bad-registry-duration "Render /var/lib/mesh-registry/registry.toml" 'handshake_timeout' \
  --limit registry -e mesh_registry_handshake_timeout=soon
refused other-trust-domain "Refuse to change the trust domain" 'trust domain is' \
  --limit registry -e mesh_registry_trust_domain=other.test
eq "registry.toml unchanged" "$(sum "$rc")" "$rc_sum"

# --- admin off loopback, opted in -----------------------------------------------------------------
say "accepted: an admin bind off loopback with meshd_admin_allow_remote"
if play admin-remote-allowed --limit node1 -e meshd_admin_bind=0.0.0.0:15000 -e meshd_admin_allow_remote=true; then
  ok "admin-remote-allowed: the run succeeds"
else
  ko "admin-remote-allowed: the run succeeds"
  show admin-remote-allowed
fi
has "admin-remote-allowed: meshd.toml admin.bind" "$mc" 'bind = "0.0.0.0:15000"'
has "admin-remote-allowed: meshd.toml admin.allow_remote" "$mc" 'allow_remote = true'
# Accepted (exit 0), with a warning on stderr that names the key.
if cc_err=$(inr "$RN" meshd check-config --config /etc/meshd/meshd.toml 2>&1 >/dev/null); then
  check "admin-remote-allowed: check-config accepts it and warns ($(head -n1 <<<"$cc_err"))" \
    grep -q '^warning: .*admin\.bind: 0\.0\.0\.0:15000 is not on loopback' <<<"$cc_err"
else
  ko "admin-remote-allowed: check-config accepts it ($cc_err)"
fi
# The exclusive run below renders the defaults again (admin on loopback, no allow_remote).

# --- meshd_services_exclusive ---------------------------------------------------------------------
say "meshd_services_exclusive removes files not in meshd_services"
if play exclusive --limit node1 -e meshd_services_exclusive=true; then
  ok "exclusive run succeeds"
else
  ko "exclusive run succeeds"
  show exclusive
fi
check "exclusive: stray.toml removed" test ! -e "$RN/etc/meshd/services.d/stray.toml"
if [ "$services_supported" = yes ]; then
  check "exclusive: web.toml and api.toml kept" test -e "$RN/etc/meshd/services.d/web.toml" -a -e "$RN/etc/meshd/services.d/api.toml"
fi
check "exclusive: meshd check-config still accepts the node" inr "$RN" meshd check-config --config /etc/meshd/meshd.toml
check "exclusive: meshd.toml back to defaults (no allow_remote)" sh -c "! grep -q '^allow_remote' '$mc'"

# --- service management, with a stand-in systemctl ----------------------------------------------
# No systemd in a chroot, so a stand-in systemctl records what the roles ask of it and keeps
# each unit's state (active or not, enabled or not, whether it can reload) in files; /ready is
# answered by a small HTTP server on this machine's loopback (the roots share its network).
say "service management (stand-in systemctl, /ready on loopback)"
fake_systemctl() {
  cat >"$1/usr/local/sbin/systemctl" <<'SH'
#!/bin/sh
# Test stand-in for systemctl (ansible/test.sh): what Ansible's systemd_service module and the
# meshd role call, with unit state in /var/lib/fake-systemd.
set -eu
d=/var/lib/fake-systemd
mkdir -p "$d"
prop=
value=
verb=
unit=
for a in "$@"; do
  case $a in
    --property=*) prop=${a#--property=} ;;
    --value) value=1 ;;
    -*) ;;
    *) if [ -z "$verb" ]; then verb=$a; else unit=$a; fi ;;
  esac
done
wants=/etc/systemd/system/multi-user.target.wants/$unit
active=$(cat "$d/$unit.active" 2>/dev/null || echo inactive)
if [ -L "$wants" ]; then enabled=enabled; else enabled=disabled; fi
canreload=$(cat "$d/can-reload" 2>/dev/null || echo no)
case $verb in
  show)
    if [ -n "$prop" ]; then
      [ -n "$value" ] || printf '%s=' "$prop"
      case $prop in CanReload) echo "$canreload" ;; ActiveState) echo "$active" ;; *) echo ;; esac
    else
      printf 'Id=%s\nLoadState=loaded\nActiveState=%s\nUnitFileState=%s\nCanReload=%s\n' \
        "$unit" "$active" "$enabled" "$canreload"
    fi ;;
  is-enabled) echo "$enabled"; [ "$enabled" = enabled ] ;;
  enable) ln -sf "/lib/systemd/system/$unit" "$wants" ;;
  disable) rm -f "$wants" ;;
  start | restart) echo active >"$d/$unit.active"; echo "$verb $unit" >>"$d/actions" ;;
  stop) echo inactive >"$d/$unit.active"; echo "$verb $unit" >>"$d/actions" ;;
  reload)
    if [ "$canreload" != yes ]; then
      echo "Failed to reload $unit: Job type reload is not applicable for unit $unit." >&2
      exit 1
    fi
    echo "reload $unit" >>"$d/actions" ;;
  *) ;;
esac
SH
  chmod 0755 "$1/usr/local/sbin/systemctl"
  mkdir -p "$1/var/lib/fake-systemd"
}
fake_systemctl "$RN"
fake_systemctl "$RR"
# actions ROOT: what the last run asked systemctl to do (start, stop, restart, reload), in order.
actions() {
  local f=$1/var/lib/fake-systemd/actions
  [ -f "$f" ] || return 0
  tr '\n' ',' <"$f" | sed 's/,$//'
}
reset_actions() { rm -f "$RN/var/lib/fake-systemd/actions" "$RR/var/lib/fake-systemd/actions"; }
python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(str(s.server_address[1]))
s.serve_forever()
' "$work/ready-port" &
ready_pid=$!
for _ in $(seq 50); do [ -s "$work/ready-port" ] && break; sleep 0.1; done
admin=127.0.0.1:$(cat "$work/ready-port")
svc=(-e meshd_manage_service=true -e "meshd_admin_bind=$admin" -e mesh_registry_manage_service=true -e "mesh_registry_admin_listen=$admin")
# managed NAME EXPECTED_ACTIONS ROOT ARGS...: a run with service management on succeeds and asks
# systemctl for exactly EXPECTED_ACTIONS.
managed() {
  local name=$1 want=$2 r=$3
  shift 3
  reset_actions
  if play "$name" "${svc[@]}" "$@"; then
    eq "$name: systemctl asked to: ${want:-nothing}" "$(actions "$r")" "$want"
  else
    ko "$name: the play succeeds"
    show "$name"
  fi
}

echo no >"$RN/var/lib/fake-systemd/can-reload"
managed registry-start "start mesh-registry.service" "$RR" --limit registry
check "registry-start: waited for /ready" grep -q 'Wait until mesh-registry is ready' "$logs/registry-start.txt"
managed registry-idempotent "" "$RR" --limit registry
check "registry-idempotent: changed=0" grep -Eq '^registry +: .*changed=0 ' "$logs/registry-idempotent.txt"

# The admin bind changes meshd.toml: a config change on a stopped meshd starts it.
managed meshd-start "start meshd.service" "$RN" --limit node1
check "meshd-start: waited for /ready" grep -Eq '^ok: \[node1\]' <(sed -n '/Wait until meshd is ready/,/^$/p' "$logs/meshd-start.txt")
managed meshd-idempotent "" "$RN" --limit node1
check "meshd-idempotent: changed=0" grep -Eq '^node1 +: .*changed=0 ' "$logs/meshd-idempotent.txt"
check "meshd.toml carries the fingerprint of its restart-only settings" \
  grep -Eq '^# Settings applied at start only .*: sha256:[0-9a-f]{64}$' "$mc"
echo yes >"$RN/var/lib/fake-systemd/can-reload"
# drain.grace_period is reloadable; gossip.interval is not (meshd would refuse the reload).
managed meshd-reload "reload meshd.service" "$RN" --limit node1 -e meshd_drain_grace_period=20s
if [ "$services_supported" = yes ]; then
  managed meshd-reload-service "reload meshd.service" "$RN" --limit node1 -e meshd_drain_grace_period=20s \
    -e '{"meshd_services": [{"name": "web", "address": "127.0.0.1:8080", "labels": {"version": "v2"}}, {"name": "api", "address": "127.0.0.1:8081", "protocol": "grpc"}]}'
  has "meshd-reload-service: web.toml changed" "$RN/etc/meshd/services.d/web.toml" '"version" = "v2"'
fi
managed meshd-restart-only-key "restart meshd.service" "$RN" --limit node1 -e meshd_drain_grace_period=20s \
  -e meshd_gossip_interval=300ms
echo no >"$RN/var/lib/fake-systemd/can-reload"
managed meshd-unit-cannot-reload "restart meshd.service" "$RN" --limit node1 -e meshd_drain_grace_period=25s \
  -e meshd_gossip_interval=300ms
echo yes >"$RN/var/lib/fake-systemd/can-reload"
managed meshd-forced-restart "restart meshd.service" "$RN" --limit node1 -e meshd_drain_grace_period=30s \
  -e meshd_gossip_interval=300ms -e meshd_config_change_action=restart

# An upgrade (the same deb repacked as a later version) restarts, once, even with a reloadable
# config change and a unit that can reload: the new process reads the new config.
say "upgrade: restart, no reload"
up=$work/up
dpkg-deb -R "$meshd_deb" "$up"
up_ver=$(dpkg-deb -f "$meshd_deb" Version)+ansibletest1
sed -i "s/^Version: .*/Version: $up_ver/" "$up/DEBIAN/control"
dpkg-deb -Zxz -b "$up" "$work/meshd_${up_ver}_amd64.deb" >/dev/null
rm -rf "$up"
upgrade=(-e "meshd_package_file=$work/meshd_${up_ver}_amd64.deb" -e meshd_drain_grace_period=35s -e meshd_gossip_interval=300ms)
managed meshd-upgrade "restart meshd.service" "$RN" --limit node1 "${upgrade[@]}"
eq "meshd-upgrade: dpkg status" "$(inr "$RN" dpkg-query -W -f '${Status} ${Version}' meshd 2>/dev/null || true)" \
  "install ok installed $up_ver"
has "meshd-upgrade: meshd.toml kept through the upgrade (with its new value)" "$mc" 'grace_period = "35s"'
eq "meshd-upgrade: meshd.toml owner and mode kept" "$(stat_of "$RN" /etc/meshd/meshd.toml)" "root:meshd 640"
managed meshd-upgrade-again "" "$RN" --limit node1 "${upgrade[@]}"
check "meshd-upgrade-again: changed=0" grep -Eq '^node1 +: .*changed=0 ' "$logs/meshd-upgrade-again.txt"
kill "$ready_pid" 2>/dev/null || true

# --- summary -----------------------------------------------------------------------------------
say "summary"
printf '%s\n' "${results[@]}"
echo
echo "$ansible_version, ansible-lint $ANSIBLE_LINT_VERSION"
echo "$passed passed, ${#failed[@]} failed, $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "ansible test: FAIL"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "ansible test: PASS"
