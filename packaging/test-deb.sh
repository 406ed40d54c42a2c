#!/usr/bin/env bash
# Installs, upgrades and purges the .deb packages that packaging/build.sh wrote to
# $CARGO_TARGET_DIR/packages (default target/packages), in a fresh Debian bookworm root (chroot),
# and checks what the maintainer scripts did. No systemd runs there (nor on this machine), so this
# covers the packaging, not the services: the units are enabled, never started.
#
#  meshd:          apt-get install ./meshd_*.deb (through apt's dependency resolution; adduser is
#                  already in bookworm's minbase, apt depends on it); binaries run;
#                  system user/group meshd without a login shell; /var/lib/meshd meshd:meshd 0700;
#                  the conffile passes `meshd check-config`; unit in place and enabled.
#                  Upgrade to a repacked 0.1.0-2 (same conffile) after editing the conffile: the
#                  edit is kept, no .dpkg-dist. Upgrade to 0.1.0-3 whose conffile changed, with
#                  --force-confold: the edit is kept and the new file lands in meshd.toml.dpkg-dist.
#                  apt-get purge: nothing of the package is left (user, state, /etc/meshd, unit).
#  mesh-registry:  install, the same checks, apt-get remove (state and user kept, unit masked),
#                  then apt-get purge (everything gone).
#  Both:           after the purges, the root holds no file that was not there before, apart from
#                  dpkg/apt bookkeeping and files of other installed packages.
#
# The debootstrap'ed root is cached as $out/bookworm-minbase.tar.zst (delete it to refresh;
# about 30 s to rebuild); every run unpacks a fresh copy of it under $TMPDIR.
# Needs root, network access to the Debian mirror ($MIRROR), and the debs already built.
#
# Usage: packaging/test-deb.sh        (exit status 0 only if every check passed)
set -euo pipefail

SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}

top=$(cd "$(dirname "$0")/.." && pwd)
out=${CARGO_TARGET_DIR:-$top/target}/packages
cache=$out/$SUITE-minbase.tar.zst

say() { printf '\n== %s\n' "$*"; }
die() { echo "test-deb.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot)"
meshd_deb=$(ls "$out"/meshd_*_amd64.deb 2>/dev/null | head -n1) || true
registry_deb=$(ls "$out"/mesh-registry_*_amd64.deb 2>/dev/null | head -n1) || true
[ -n "$meshd_deb" ] && [ -n "$registry_deb" ] || die "no debs in $out: run packaging/build.sh first"
meshd_ver=$(dpkg-deb -f "$meshd_deb" Version)
[ "$meshd_ver" = 0.1.0-1 ] || die "expected meshd 0.1.0-1, found $meshd_ver (the upgrade versions are fixed)"

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/test-deb.XXXXXX")
R=$work/root

cleanup() {
  local rc=$?
  set +e
  # Anything still running inside the chroot was started by this script.
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$R" ] && kill -9 "${p#/proc/}" 2>/dev/null
  done
  mountpoint -q "$R/proc" && umount "$R/proc"
  [ -n "${netns_made:-}" ] && ip netns del "$netns_made"
  # Never rm -rf through a live mount.
  if grep -qF " $work/" /proc/mounts; then
    echo "test-deb.sh: mounts left under $work, not deleting it:" >&2
    grep -F " $work/" /proc/mounts >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the Debian root ------------------------------------------------------------------------
if [ ! -s "$cache" ]; then
  say "debootstrap $SUITE (no cache at $cache)"
  if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
  fi
  b=$work/bootstrap
  debootstrap --variant=minbase "$SUITE" "$b" "$MIRROR"
  cp /etc/resolv.conf "$b/etc/resolv.conf"
  # Package lists in the cache too: each run's apt-get update then only checks for changes.
  chroot "$b" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C apt-get -q update
  chroot "$b" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C apt-get clean
  rm -f "$b/etc/resolv.conf"
  mkdir -p "$out"
  tar --numeric-owner --zstd -C "$b" -cf "$cache.tmp" .
  mv "$cache.tmp" "$cache"
  rm -rf "$b"
  echo "cached $(du -h "$cache" | cut -f1) root in $cache"
else
  say "using cached root $cache"
fi
mkdir "$R"
tar --numeric-owner --zstd -C "$R" -xpf "$cache"
cp /etc/resolv.conf "$R/etc/resolv.conf"
mount -t proc proc "$R/proc"
mkdir -p "$R/tmp/debs"

# Runs a command in the chroot, non-interactively, stdin closed (a dpkg conffile prompt fails
# instead of hanging).
inr() {
  chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C HOME=/root \
    DEBIAN_FRONTEND=noninteractive "$@" </dev/null
}
APT=(apt-get -q -y -o Dpkg::Use-Pty=0)

# --- checks ---------------------------------------------------------------------------------
passed=0
failed=()
results=()
ok() { passed=$((passed + 1)); results+=("PASS  $1"); echo "PASS: $1"; }
ko() { failed+=("$1"); results+=("FAIL  $1"); echo "FAIL: $1" >&2; }
# check "description" command...: runs the command on the host (paths under $R).
check() { local d=$1; shift; if "$@"; then ok "$d"; else ko "$d"; fi; }
# incheck "description" command...: runs the command in the chroot.
incheck() { local d=$1; shift; if inr "$@"; then ok "$d"; else ko "$d"; fi; }
# eq "description" actual expected
eq() { if [ "$2" = "$3" ]; then ok "$1"; else ko "$1 (got '$2', want '$3')"; fi; }
absent() { local p; for p; do if [ -e "$R$p" ] || [ -L "$R$p" ]; then echo "  still there: $p" >&2; return 1; fi; done; }
present() { local p; for p; do [ -e "$R$p" ] || { echo "  missing: $p" >&2; return 1; }; done; }
# "not-known" once dpkg has forgotten the package (purged, or never installed).
status_of() {
  local s
  s=$(inr dpkg-query -W -f '${Status} ${Version}' "$1" 2>/dev/null) || s=
  case $s in "" | *" not-installed"*) echo not-known ;; *) echo "$s" ;; esac
}
stat_of() { inr stat -c '%U:%G %a' "$1" 2>/dev/null || echo "missing"; }

# A system account as the postinst makes it: uid/gid below 1000, primary group of its own, no
# login shell, the home the unit's StateDirectory= uses.
check_account() {
  local u=$1 pw gr
  pw=$(inr getent passwd "$u") || { ko "$u: user exists"; return; }
  gr=$(inr getent group "$u") || { ko "$u: group exists"; return; }
  ok "$u: user and group exist ($pw)"
  IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
  IFS=: read -r _ _ ggid _ <<<"$gr"
  check "$u: system uid/gid (< 1000)" test "$uid" -lt 1000 -a "$ggid" -lt 1000
  eq "$u: primary group is $u" "$gid" "$ggid"
  case $shell in
    /usr/sbin/nologin | /sbin/nologin | /bin/false | /usr/bin/false) ok "$u: no login shell ($shell)" ;;
    *) ko "$u: no login shell (got '$shell')" ;;
  esac
  eq "$u: home" "$home" "/var/lib/$u"
}

# Every path that exists in the root, less what changes anyway. Used to find leftovers of purge.
snapshot() {
  (cd "$R" && find . -xdev \( -path ./proc -o -path ./tmp -o -path ./var/log -o -path ./var/cache \
    -o -path ./var/lib/apt -o -path ./var/lib/dpkg -o -path ./run \) -prune -o -print | sort)
}

# --- meshd: install --------------------------------------------------------------------------
cp "$meshd_deb" "$registry_deb" "$R/tmp/debs/"
mdeb=/tmp/debs/$(basename "$meshd_deb")
rdeb=/tmp/debs/$(basename "$registry_deb")

say "apt-get update (in the root)"
check "apt-get update" inr apt-get -q update
snapshot >"$work/before.txt"

say "meshd: install $(basename "$meshd_deb")"
check "no systemd in the root (/run/systemd/system absent)" absent /run/systemd/system
check "meshd 0.1.0-1: apt-get install (postinst without systemd)" inr "${APT[@]}" install "$mdeb"
eq "meshd: dpkg status" "$(status_of meshd)" "install ok installed 0.1.0-1"
# Depends: adduser, libc6. bookworm's minbase has both already (apt depends on adduser), so apt
# fetches nothing here; the install still goes through apt's dependency resolution.
eq "meshd: Depends (adduser) satisfied" "$(status_of adduser | cut -d' ' -f1-3)" "install ok installed"
check "meshd: /usr/bin/meshd and /usr/bin/meshctl are executable" test -x "$R/usr/bin/meshd" -a -x "$R/usr/bin/meshctl"
incheck "meshd --version runs" meshd --version
incheck "meshctl --version runs" meshctl --version
check_account meshd
eq "meshd: /var/lib/meshd owner and mode" "$(stat_of /var/lib/meshd)" "meshd:meshd 700"
eq "meshd: /etc/meshd/services.d" "$(stat_of /etc/meshd/services.d)" "root:root 755"
check "meshd: /etc/meshd/meshd.toml exists" present /etc/meshd/meshd.toml
check "meshd: /etc/meshd/meshd.toml is a conffile" \
  sh -c "chroot '$R' dpkg-query -W -f '\${Conffiles}' meshd | grep -q '^ /etc/meshd/meshd.toml '"
# The shipped config needs no join token to pass (the token is read at the first start only).
incheck "meshd check-config --config /etc/meshd/meshd.toml (as shipped)" \
  meshd check-config --config /etc/meshd/meshd.toml
check "meshd: unit /lib/systemd/system/meshd.service" present /lib/systemd/system/meshd.service
eq "meshd: unit enabled (multi-user.target.wants symlink)" \
  "$(readlink "$R/etc/systemd/system/multi-user.target.wants/meshd.service" || true)" /lib/systemd/system/meshd.service

# --- meshd: upgrades ---------------------------------------------------------------------------
# Repacks the 0.1.0-1 deb as version $2; with $3 = changed, the shipped conffile changes too.
repack() {
  local src=$1 ver=$2 how=$3 d=$work/repack
  rm -rf "$d"
  dpkg-deb -R "$src" "$d"
  sed -i "s/^Version: .*/Version: $ver/" "$d/DEBIAN/control"
  if [ "$how" = changed ]; then
    printf '\n# (%s: a line added upstream, to test the conffile prompt)\n' "$ver" >>"$d/etc/meshd/meshd.toml"
  fi
  if [ -f "$d/DEBIAN/md5sums" ]; then
    (cd "$d" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
  fi
  dpkg-deb -Zxz -b "$d" "$R/tmp/debs/meshd_${ver}_amd64.deb" >/dev/null
  rm -rf "$d"
}
repack "$meshd_deb" 0.1.0-2 same
repack "$meshd_deb" 0.1.0-3 changed

say "meshd: edit the conffile, upgrade to 0.1.0-2 (same shipped conffile)"
sed -i 's/^node_name = .*/node_name = "edited-node"/' "$R/etc/meshd/meshd.toml"
echo marker >"$R/var/lib/meshd/state-marker"
inr chown meshd:meshd /var/lib/meshd/state-marker
uid_before=$(inr id -u meshd)
check "meshd 0.1.0-2: apt-get install --force-confold" \
  inr "${APT[@]}" -o Dpkg::Options::=--force-confold install /tmp/debs/meshd_0.1.0-2_amd64.deb
eq "meshd: dpkg status after upgrade" "$(status_of meshd)" "install ok installed 0.1.0-2"
check "meshd 0.1.0-2: edited node_name kept" grep -qx 'node_name = "edited-node"' "$R/etc/meshd/meshd.toml"
if [ -e "$R/etc/meshd/meshd.toml.dpkg-dist" ]; then dist2=created; else dist2="not created"; fi
eq "meshd 0.1.0-2: meshd.toml.dpkg-dist (shipped conffile unchanged)" "$dist2" "not created"
eq "meshd 0.1.0-2: state in /var/lib/meshd kept" "$(cat "$R/var/lib/meshd/state-marker" 2>/dev/null || true)" marker
eq "meshd 0.1.0-2: /var/lib/meshd owner and mode" "$(stat_of /var/lib/meshd)" "meshd:meshd 700"
eq "meshd 0.1.0-2: same meshd uid" "$(inr id -u meshd)" "$uid_before"
incheck "meshd 0.1.0-2: check-config passes on the edited file" meshd check-config --config /etc/meshd/meshd.toml
eq "meshd 0.1.0-2: unit still enabled" \
  "$(readlink "$R/etc/systemd/system/multi-user.target.wants/meshd.service" || true)" /lib/systemd/system/meshd.service

say "meshd: upgrade to 0.1.0-3 (shipped conffile changed too), --force-confold"
check "meshd 0.1.0-3: apt-get install --force-confold" \
  inr "${APT[@]}" -o Dpkg::Options::=--force-confold install /tmp/debs/meshd_0.1.0-3_amd64.deb
eq "meshd: dpkg status after upgrade" "$(status_of meshd)" "install ok installed 0.1.0-3"
check "meshd 0.1.0-3: edited node_name kept" grep -qx 'node_name = "edited-node"' "$R/etc/meshd/meshd.toml"
if [ -e "$R/etc/meshd/meshd.toml.dpkg-dist" ]; then dist3=created; else dist3="not created"; fi
eq "meshd 0.1.0-3: meshd.toml.dpkg-dist (shipped conffile changed)" "$dist3" created
check "meshd 0.1.0-3: .dpkg-dist holds the new shipped file" grep -q '0.1.0-3: a line added upstream' "$R/etc/meshd/meshd.toml.dpkg-dist"

# --- meshd: purge --------------------------------------------------------------------------------
say "meshd: apt-get purge"
check "meshd: apt-get purge" inr "${APT[@]}" purge meshd
eq "meshd: dpkg knows nothing of it" "$(status_of meshd)" "not-known"
check "meshd: dpkg -l meshd lists nothing" sh -c "! chroot '$R' dpkg -l meshd >/dev/null 2>&1"
check "meshd: binaries gone" absent /usr/bin/meshd /usr/bin/meshctl
check "meshd: unit, enablement and mask gone" absent /lib/systemd/system/meshd.service \
  /etc/systemd/system/multi-user.target.wants/meshd.service /etc/systemd/system/meshd.service \
  /var/lib/systemd/deb-systemd-helper-enabled/meshd.service.dsh-also \
  /var/lib/systemd/deb-systemd-helper-masked/meshd.service
check "meshd: /etc/meshd gone (conffile, .dpkg-dist, services.d)" absent /etc/meshd
check "meshd: /var/lib/meshd gone" absent /var/lib/meshd
check "meshd: user gone" sh -c "! chroot '$R' getent passwd meshd"
check "meshd: group gone" sh -c "! chroot '$R' getent group meshd"

# --- mesh-registry -------------------------------------------------------------------------------
say "mesh-registry: install $(basename "$registry_deb")"
rver=$(dpkg-deb -f "$registry_deb" Version)
check "mesh-registry: apt-get install (postinst without systemd)" inr "${APT[@]}" install "$rdeb"
eq "mesh-registry: dpkg status" "$(status_of mesh-registry)" "install ok installed $rver"
check "mesh-registry: /usr/bin/mesh-registry is executable" test -x "$R/usr/bin/mesh-registry"
incheck "mesh-registry --version runs" mesh-registry --version
check_account mesh-registry
eq "mesh-registry: /var/lib/mesh-registry owner and mode" "$(stat_of /var/lib/mesh-registry)" "mesh-registry:mesh-registry 700"
check "mesh-registry: unit /lib/systemd/system/mesh-registry.service" present /lib/systemd/system/mesh-registry.service
eq "mesh-registry: unit enabled" \
  "$(readlink "$R/etc/systemd/system/multi-user.target.wants/mesh-registry.service" || true)" /lib/systemd/system/mesh-registry.service

say "mesh-registry: apt-get remove (keeps state and user), then purge"
echo marker >"$R/var/lib/mesh-registry/state-marker"
check "mesh-registry: apt-get remove" inr "${APT[@]}" remove mesh-registry
eq "mesh-registry: dpkg status after remove" "$(status_of mesh-registry | cut -d' ' -f1-3)" "deinstall ok config-files"
check "mesh-registry: binary and unit gone after remove" absent /usr/bin/mesh-registry /lib/systemd/system/mesh-registry.service
check "mesh-registry: state and user kept after remove" \
  sh -c "[ -f '$R/var/lib/mesh-registry/state-marker' ] && chroot '$R' getent passwd mesh-registry >/dev/null"
eq "mesh-registry: unit masked after remove" "$(readlink "$R/etc/systemd/system/mesh-registry.service" || true)" /dev/null
check "mesh-registry: apt-get purge" inr "${APT[@]}" purge mesh-registry
eq "mesh-registry: dpkg knows nothing of it" "$(status_of mesh-registry)" "not-known"
check "mesh-registry: dpkg -l mesh-registry lists nothing" sh -c "! chroot '$R' dpkg -l mesh-registry >/dev/null 2>&1"
check "mesh-registry: unit, enablement and mask gone" absent /etc/systemd/system/mesh-registry.service \
  /etc/systemd/system/multi-user.target.wants/mesh-registry.service \
  /var/lib/systemd/deb-systemd-helper-enabled/mesh-registry.service.dsh-also \
  /var/lib/systemd/deb-systemd-helper-masked/mesh-registry.service
check "mesh-registry: /var/lib/mesh-registry gone" absent /var/lib/mesh-registry
check "mesh-registry: user gone" sh -c "! chroot '$R' getent passwd mesh-registry"
check "mesh-registry: group gone" sh -c "! chroot '$R' getent group mesh-registry"

# --- leftovers -----------------------------------------------------------------------------------
say "leftovers after both purges"
snapshot >"$work/after.txt"
: >"$work/left.txt"
comm -13 "$work/before.txt" "$work/after.txt" | while IFS= read -r p; do
  p=${p#.}
  case $p in
    # Backups that shadow's and adduser's tools write when they edit the account files.
    /etc/passwd- | /etc/group- | /etc/shadow- | /etc/gshadow- | /etc/subuid- | /etc/subgid-) continue ;;
  esac
  # Files that belong to an installed package are not leftovers of ours.
  inr dpkg-query -S "$p" >/dev/null 2>&1 && continue
  echo "$p" >>"$work/left.txt"
done
if [ -s "$work/left.txt" ]; then
  sed 's/^/  left: /' "$work/left.txt" >&2
  ko "no files left behind by meshd or mesh-registry ($(wc -l <"$work/left.txt") left)"
else
  ok "no files left behind by meshd or mesh-registry"
fi
check "no meshd/mesh-registry entry in passwd, group, shadow, gshadow" \
  sh -c "! grep -E '^(meshd|mesh-registry):' '$R/etc/passwd' '$R/etc/group' '$R/etc/shadow' '$R/etc/gshadow'"

# --- the README's walkthrough ------------------------------------------------------------------------
# "On one VM, from the packages" in README.md, command for command, with the daemons started as
# their units would (same user, same command line) since no systemd runs here. In a network
# namespace of its own so its loopback ports cannot clash with the build machine's.
say "README walkthrough: install, registry, token, a service, meshctl services, reload"
ns=test-deb-$$
ip netns add "$ns"
netns_made=$ns
ip -n "$ns" link set lo up
# innet command...: in the chroot and the namespace (what the VM is).
innet() {
  ip netns exec "$ns" chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
    HOME=/root "$@" </dev/null
}
# Polls `innet sh -c "$2"` for up to 30 s.
waitfor() {
  local d=$1 cmd=$2 i
  for i in $(seq 1 60); do
    if innet sh -c "$cmd" >/dev/null 2>&1; then ok "$d"; return; fi
    sleep 0.5
  done
  ko "$d"
  innet sh -c "$cmd" >&2 || true
}
check "walkthrough: apt-get install ./mesh-registry_*.deb ./meshd_*.deb" \
  inr "${APT[@]}" install "$rdeb" "$mdeb"
check "walkthrough: mesh-registry init (as mesh-registry)" \
  innet runuser -u mesh-registry -- mesh-registry init --trust-domain mesh.internal \
  --data-dir /var/lib/mesh-registry --listen 127.0.0.1:7700
# systemctl start mesh-registry: the unit's ExecStart, as its User=.
innet sh -c 'runuser -u mesh-registry -- mesh-registry run --config /var/lib/mesh-registry/registry.toml \
  >/var/log/mesh-registry.log 2>&1 &'
waitfor "walkthrough: the registry answers (meshctl nodes)" \
  'meshctl --credentials /var/lib/mesh-registry/admin nodes'
check "walkthrough: meshctl token create --services web,api > /etc/meshd/join-token" \
  innet sh -c 'meshctl --credentials /var/lib/mesh-registry/admin token create --services web,api --uses 1 \
    >/etc/meshd/join-token && chgrp meshd /etc/meshd/join-token && chmod 0640 /etc/meshd/join-token'
check "walkthrough: point meshd.toml at the registry" \
  inr sed -i 's/^address = "registry.mesh.internal:7700"/address = "127.0.0.1:7700"/' /etc/meshd/meshd.toml
check "walkthrough: cp the example web.toml into services.d" \
  inr cp /usr/share/doc/meshd/examples/web.toml /etc/meshd/services.d/web.toml
incheck "walkthrough: meshd check-config" meshd check-config
# The app web stands for (the example's health check asks it for /healthz).
innet sh -c 'meshd demo-app --listen 127.0.0.1:8080 --name web >/var/log/web-app.log 2>&1 &'
# systemctl start meshd: ExecStartPre passed above; ExecStart as User=meshd.
innet sh -c 'runuser -u meshd -- meshd run --config /etc/meshd/meshd.toml >/var/log/meshd.log 2>&1 &'
waitfor "walkthrough: meshd answers on its admin port" 'meshctl services'
waitfor "walkthrough: meshctl services lists default/web, healthy" \
  'meshctl services | grep -E "default/web .*node-1.*healthy" | grep -v unhealthy'
eq "walkthrough: meshd runs as meshd (owner of the identity it stored)" \
  "$(inr stat -c %U /var/lib/meshd/identity 2>&1)" meshd
# systemctl reload meshd: ExecReload (check-config, then SIGHUP).
check "walkthrough: add services.d/api.toml" \
  sh -c "printf 'name = \"api\"\naddress = \"127.0.0.1:8081\"\n' >'$R/etc/meshd/services.d/api.toml'"
incheck "walkthrough: reload: check-config" meshd check-config --config /etc/meshd/meshd.toml
# The one process of user meshd is the daemon (runuser stays root; the demo app runs as root).
check "walkthrough: reload: kill -HUP meshd" innet sh -c \
  'kill -HUP $(stat -c "%U %n" /proc/[0-9]* | awk "\$1 == \"meshd\" { sub(\"/proc/\", \"\", \$2); print \$2 }")'
waitfor "walkthrough: meshctl services lists default/api after the reload" \
  'meshctl services | grep -q "default/api .*node-1"'
check "walkthrough: the reload was logged as applied" \
  grep -q "configuration reloaded" "$R/var/log/meshd.log"

# --- summary -------------------------------------------------------------------------------------
say "summary"
printf '%s\n' "${results[@]}"
echo
echo "conffile on upgrade: 0.1.0-1 -> 0.1.0-2 (same shipped file): edit kept, .dpkg-dist $dist2;"
echo "                     0.1.0-2 -> 0.1.0-3 (shipped file changed, --force-confold): edit kept, .dpkg-dist $dist3"
echo "$passed passed, ${#failed[@]} failed, $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "test-deb: FAIL"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "test-deb: PASS"
