#!/usr/bin/env bash
# Builds the binaries and the two FROM-scratch images:
#   iothub-emulator:<tag>        the hub (docker/hub.Dockerfile)
#   iothub-emulator-fleet:<tag>  fleet + testbench + scenarios/ (docker/fleet.Dockerfile)
#
# Usage: docker/build.sh [--profile release|dev] [--no-build] [--tag TAG]
#   --profile  the cargo profile of the binaries put in the images (default: release). `dev` builds
#              what `cargo test --workspace` builds (target/debug), so CI compiles once for both.
#   --no-build do not run cargo; use the binaries already in the profile's target directory.
#   --tag      the image tag (default: dev).
#
# Why dynamic binaries plus the libraries they load, not `-C target-feature=+crt-static`: a static
# glibc build needs `--target x86_64-unknown-linux-gnu`, a second full build of every dependency
# into its own directory (minutes on two cores, on every CI run), whereas copying what `ldd` lists
# (the loader, libc, libm, libgcc_s) reuses the binaries cargo already built, in any profile. It
# is also the more robust choice for name lookups: a static glibc still dlopen()s NSS modules for
# getaddrinfo (and warns so at link time), while the dynamic binary resolves compose service names
# such as `hub` through the glibc it was linked against, copied unchanged into the image (the
# compose smoke test and tests/containers.rs depend on that lookup).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
build=1
tag=dev
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile)
            [[ $# -ge 2 ]] || { echo "docker/build.sh: --profile needs a value: release or dev" >&2; exit 2; }
            profile="$2"
            shift 2
            ;;
        --no-build) build=0; shift ;;
        --tag)
            [[ $# -ge 2 && -n "$2" ]] || { echo "docker/build.sh: --tag needs a value" >&2; exit 2; }
            tag="$2"
            shift 2
            ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "docker/build.sh: unknown argument '$1' (allowed: --profile release|dev, --no-build, --tag TAG)" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) profile_dir=release ;;
    dev|debug) profile=dev; profile_dir=debug ;;
    *) echo "docker/build.sh: --profile must be release or dev, not '$profile'" >&2; exit 2 ;;
esac

target_dir="${CARGO_TARGET_DIR:-target}"
bin_dir="$target_dir/$profile_dir"
stage="$target_dir/docker"
started=$SECONDS

if [[ $build == 1 ]]; then
    if [[ $profile == dev ]]; then
        # Exactly what `cargo test --workspace` builds (same targets, so the same features), so the
        # test run after this reuses every artifact instead of rebuilding with another feature set.
        echo "== cargo build --workspace --all-targets (dev profile, as cargo test builds it)"
        cargo build --workspace --all-targets
    else
        echo "== cargo build --profile $profile (iothub-emulator, fleet, testbench)"
        cargo build --profile "$profile" -p iothub-emulator -p simulated-devices -p testbench --bins
    fi
fi
for bin in iothub-emulator fleet testbench; do
    [[ -x "$bin_dir/$bin" ]] || { echo "docker/build.sh: $bin_dir/$bin is missing; run without --no-build" >&2; exit 1; }
done

# Copies `file` to the same absolute path under `root` (following symlinks).
copy_at_path() {
    local file="$1" root="$2"
    mkdir -p "$root$(dirname "$file")"
    cp -L "$file" "$root$file"
}

# Copies each binary into root/usr/local/bin and every library it loads (with the loader) to the
# path `ldd` reports, so the loader finds them without an ld.so.cache.
add_binaries() {
    local root="$1"
    shift
    mkdir -p "$root/usr/local/bin"
    local bin deps lib
    for bin in "$@"; do
        cp "$bin" "$root/usr/local/bin/"
        deps="$(ldd "$bin")"
        if grep -q "not found" <<<"$deps"; then
            echo "docker/build.sh: $bin needs a library that is not installed:" >&2
            echo "$deps" >&2
            exit 1
        fi
        for lib in $(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' <<<"$deps"); do
            copy_at_path "$lib" "$root"
        done
    done
    # getaddrinfo reads nsswitch.conf; /etc/hosts first, then DNS (Docker's resolver for service
    # names). glibc >= 2.34 has both modules built in; older ones dlopen() these if present.
    local nss
    for nss in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2; do
        [[ -e "$nss" ]] && copy_at_path "$nss" "$root"
    done
    mkdir -p "$root/etc"
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
    mkdir -p "$root/tmp"
    chmod 1777 "$root/tmp"
}

echo "== staging image contents under $stage"
rm -rf "$stage/hub" "$stage/fleet"

hub_root="$stage/hub/rootfs"
add_binaries "$hub_root" "$bin_dir/iothub-emulator"
mkdir -p "$hub_root/data"

fleet_root="$stage/fleet/rootfs"
add_binaries "$fleet_root" "$bin_dir/fleet" "$bin_dir/testbench"
mkdir -p "$fleet_root/work" "$fleet_root/data"
cp -r scenarios "$fleet_root/scenarios"

echo "== docker build"
docker build --quiet -f docker/hub.Dockerfile -t "iothub-emulator:$tag" "$stage/hub"
docker build --quiet -f docker/fleet.Dockerfile -t "iothub-emulator-fleet:$tag" "$stage/fleet"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^iothub-emulator(-fleet)?:$tag " || true
echo "images built with the $profile profile in $((SECONDS - started)) s"
