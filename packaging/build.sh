#!/usr/bin/env bash
# Builds and checks the native packages: meshd and mesh-registry as .deb (cargo-deb) and .rpm
# (cargo-generate-rpm), written to $CARGO_TARGET_DIR/packages (default target/packages).
#
# Not part of .ci/run on purpose: a first run installs cargo-generate-rpm (about 7 minutes of
# compiling) and every run does an LTO release build. Run it by hand, or in a CI job of its own
# when packaging/ or a [package.metadata.*] section changes.
#
# What it does: installs the tools it lacks (pinned cargo-deb and cargo-generate-rpm; lintian
# and rpm through apt-get when root), checks the shipped example against the source, builds the
# release binaries, runs `meshd check-config` on the shipped default config, builds the four
# packages, then checks them: lintian (fails on errors), dpkg-deb -c/-I, rpm -qip,
# rpm -qlp --configfiles (the config files must be listed), rpm -qp --scripts, rpmlint (fails on
# errors not filtered, with reasons, in packaging/rpmlint.toml).
# Not covered: installing, upgrading and purging in Debian/RHEL roots or containers.
# packaging/test-deb.sh then installs, upgrades and purges the debs in a Debian bookworm chroot.
#
# Usage: packaging/build.sh
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
out=$target/packages
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() { printf '\n== %s\n' "$*"; }
die() { echo "build.sh: $*" >&2; exit 1; }

# --- tools ---------------------------------------------------------------------------------
say "tools"
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
if ! cargo generate-rpm --version 2>/dev/null | grep -qF "$CARGO_GENERATE_RPM_VERSION"; then
  echo "installing cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION (about 7 minutes)"
  cargo install cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION" --locked
fi
missing=()
for tool in lintian:lintian rpm:rpm rpmlint:rpmlint dpkg-deb:dpkg strip:binutils; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root or apt-get install them"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "cargo-deb $(cargo deb --version | awk '{print $NF}'), $(cargo generate-rpm --version), lintian $(lintian --version | awk '{print $NF}'), rpm $(rpm --version | awk '{print $NF}'), rpmlint $(rpmlint --version)"

# --- shipped files in step with the source -------------------------------------------------
say "shipped example service file"
awk '/^pub const EXAMPLE_SERVICE_TOML: &str = r#"/ { f = 1; sub(/^.*r#"/, ""); print; next }
     f && /^"#;$/ { exit }
     f { print }' meshd/src/config/example.rs >"$tmp/web.toml"
[ -s "$tmp/web.toml" ] || die "EXAMPLE_SERVICE_TOML not found in meshd/src/config/example.rs"
diff -u "$tmp/web.toml" packaging/meshd/examples/web.toml \
  || die "packaging/meshd/examples/web.toml differs from EXAMPLE_SERVICE_TOML; copy it over"
echo "packaging/meshd/examples/web.toml matches EXAMPLE_SERVICE_TOML"

# --- binaries ------------------------------------------------------------------------------
say "release build"
cargo build --release --locked -p meshd -p meshctl -p mesh-registry
bin=$target/release

# meshd is built again with profile-guided optimisation from the committed profile
# (packaging/pgo/meshd.profdata, made by bench/pgo.sh from the benchmark's workload): 16% less
# CPU per proxied HTTP request in one bench/run.sh run (BENCHMARKS.md, "Profile-guided
# optimisation"). Functions changed since the profile was made are compiled as without it.
# In a target dir of its own (RUSTFLAGS are part of every crate's fingerprint), then put where
# cargo-deb and cargo-generate-rpm take it from.
say "profile-guided meshd"
profile=$root/packaging/pgo/meshd.profdata
[ -f "$profile" ] || die "$profile missing; bench/pgo.sh makes it"
RUSTFLAGS="-Cprofile-use=$profile -Cllvm-args=-no-pgo-warn-mismatch" \
  CARGO_TARGET_DIR="$target/pgo/use-target" cargo build --release --locked -p meshd
cp "$target/pgo/use-target/release/meshd" "$bin/meshd"
# meshctl is its own crate, packed into the meshd deb as an asset: cargo-deb strips only the
# package's own binaries, so strip it here as cargo-deb would.
strip --strip-unneeded "$bin/meshctl"

say "default config passes check-config"
# As installed, except services_dir: a scratch directory with the example service in it.
mkdir -p "$tmp/etc/services.d"
cp packaging/meshd/examples/web.toml "$tmp/etc/services.d/web.toml"
sed "s|^services_dir = .*|services_dir = \"$tmp/etc/services.d\"|" packaging/meshd/meshd.toml \
  >"$tmp/etc/meshd.toml"
"$bin/meshd" check-config --config "$tmp/etc/meshd.toml"
rm "$tmp/etc/services.d/web.toml"
"$bin/meshd" check-config --config "$tmp/etc/meshd.toml"

# --- packages ------------------------------------------------------------------------------
# Only the packages: test-deb.sh and ansible/test.sh cache their Debian root tarball here too.
rm -f "$out"/*.deb "$out"/*.rpm
mkdir -p "$out"
say "cargo deb"
cargo deb --no-build --strip -p meshd -o "$out/"
cargo deb --no-build --strip -p mesh-registry -o "$out/"

say "cargo generate-rpm"
# cargo-generate-rpm packs target/release as it is, and the release profile keeps line tables
# (debug = 1). Pack stripped copies instead (cargo-deb strips its own), through --target-dir,
# which is where it resolves target/release/ asset paths.
mkdir -p "$out/rpm-target/release"
for b in meshd meshctl mesh-registry; do
  strip --strip-debug -o "$out/rpm-target/release/$b" "$bin/$b"
done
cargo generate-rpm -p meshd --target-dir "$out/rpm-target" -o "$out/"
cargo generate-rpm -p registry --target-dir "$out/rpm-target" -o "$out/"
rm -rf "$out/rpm-target"

# --- checks --------------------------------------------------------------------------------
status=0
summary=()
fail() { echo "FAIL: $*" >&2; status=1; }

for deb in "$out"/*.deb; do
  name=$(basename "$deb")
  say "dpkg-deb -I $name"
  dpkg-deb -I "$deb"
  say "dpkg-deb -c $name"
  dpkg-deb -c "$deb"
  say "lintian $name"
  # Errors fail the build; warnings are printed. Expected warnings, not fixable here:
  #  - no-manual-page: there are no man pages yet (clap_mangen could generate them; that is a
  #    new build dependency);
  #  - initial-upload-closes-no-bugs: the changelog closes no Debian ITP bug, since these
  #    packages are not uploaded to Debian.
  lintian --no-tag-display-limit --info "$deb" | tee "$tmp/lintian.txt" || true
  if grep -q '^E: ' "$tmp/lintian.txt"; then
    fail "lintian errors in $name"
  fi
  summary+=("$name: lintian $(grep -c '^E: ' "$tmp/lintian.txt") error(s), $(grep -c '^W: ' "$tmp/lintian.txt") warning(s)")
done

for rpmf in "$out"/*.rpm; do
  name=$(basename "$rpmf")
  say "rpm -qip $name"
  rpm -qip "$rpmf"
  say "rpm -qlvp $name"
  rpm -qlvp "$rpmf"
  say "rpm -qp --requires $name"
  rpm -qp --requires "$rpmf"
  say "rpm -qlp --configfiles $name"
  rpm -qlp --configfiles "$rpmf" | tee "$tmp/conf.txt"
  case $name in
    meshd-*)
      grep -qx /etc/meshd/meshd.toml "$tmp/conf.txt" || fail "$name: /etc/meshd/meshd.toml is not a config file"
      flags=$(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpmf" | awk '$1 == "/etc/meshd/meshd.toml" { print $2 }')
      [ "$flags" = cn ] || fail "$name: /etc/meshd/meshd.toml flags are '$flags', want 'cn' (%config(noreplace))"
      ;;
  esac
  say "rpm -qp --scripts $name"
  rpm -qp --scripts "$rpmf" | tee "$tmp/scripts.txt"
  # A scriptlet path that cargo-generate-rpm could not find is packed as the script text.
  for s in preinstall postinstall preuninstall postuninstall; do
    grep -q "^$s scriptlet" "$tmp/scripts.txt" || fail "$name: no $s scriptlet"
  done
  if grep -q '^\.\./packaging/' "$tmp/scripts.txt"; then
    fail "$name: a scriptlet is a file name, not a script"
  fi
  say "rpmlint $name"
  # Errors fail the build; packaging/rpmlint.toml filters the findings that do not apply, each
  # with its reason.
  if ! rpmlint -c packaging/rpmlint.toml "$rpmf" | tee "$tmp/rpmlint.txt"; then
    fail "rpmlint errors in $name"
  fi
  summary+=("$name: $(rpm -qlp "$rpmf" | wc -l) files, config: $(tr '\n' ' ' <"$tmp/conf.txt"), rpmlint: $(tail -n1 "$tmp/rpmlint.txt" | grep -o '[0-9]* errors, [0-9]* warnings')")
done

say "summary ($out)"
ls -l "$out"
printf '%s\n' "${summary[@]}"
[ "$status" -eq 0 ] && echo "packages ok" || echo "packages FAILED (see FAIL lines above)"
exit "$status"
