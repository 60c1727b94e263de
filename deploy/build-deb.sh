#!/bin/sh
# Builds the Debian packages sundial-agent and sundial-coordinator with
# dpkg-deb from already built binaries (cargo-deb users: the same layout is
# in the [package.metadata.deb] sections, `cargo deb -p sundial-agent`).
#
#   deploy/build-deb.sh [--bin-dir target/release] [--out target/debian] [--arch ARCH]
#
# Build the binaries first: cargo build --release
# (for aarch64 / armv7 devices see deploy/README.md).
set -eu

prog=build-deb.sh
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bin_dir=$repo/target/release
out=$repo/target/debian
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --arch) arch=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1'" ;;
    esac
done
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (apt-get install dpkg)"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
[ -n "$version" ] || die "no version in Cargo.toml"
mkdir -p "$out"

# package NAME SUMMARY UNIT CONFIG BINARIES...
package() {
    name=$1 summary=$2 unit=$3 config=$4 scripts=$5
    shift 5
    stage=$(mktemp -d)
    chmod 0755 "$stage"
    trap 'rm -rf "$stage"' EXIT
    install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
        "$stage/etc/sundial" "$stage/usr/share/doc/$name"
    for b in "$@"; do
        [ -x "$bin_dir/$b" ] || die "$bin_dir/$b not found: build it first (cargo build --release)"
        install -m 0755 "$bin_dir/$b" "$stage/usr/bin/$b"
        strip --strip-unneeded "$stage/usr/bin/$b" 2>/dev/null || true
    done
    install -m 0644 "$here/$unit" "$stage/lib/systemd/system/$unit"
    chmod 0644 "$stage/lib/systemd/system/$unit"
    install -m 0644 "$here/$config" "$stage/etc/sundial/$config"
    install -m 0644 "$here/README.md" "$stage/usr/share/doc/$name/README.md"
    for s in postinst prerm postrm; do
        install -m 0755 "$here/debian/$scripts/$s" "$stage/DEBIAN/$s"
    done
    echo "/etc/sundial/$config" >"$stage/DEBIAN/conffiles"
    size=$(du -sk "$stage" | cut -f1)
    cat >"$stage/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: Sundial developers <sundial@example.invalid>
Installed-Size: $size
Depends: adduser | passwd
Section: admin
Priority: optional
Description: $summary
 Sundial schedules tasks on fleets of edge devices: agents fire on time from
 their own clock, online or not, and sync run records back exactly once.
CONTROL
    deb=$out/${name}_${version}_${arch}.deb
    dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
    rm -rf "$stage"
    trap - EXIT
    echo "$deb"
}

package sundial-agent "Sundial agent: fires scheduled tasks on a device, online or not" \
    sundial-agent.service agent.toml agent sundial-agent
package sundial-coordinator "Sundial coordinator and its admin CLI" \
    sundial-coordinator.service coordinator.toml coordinator sundial-coordinator sundialctl
