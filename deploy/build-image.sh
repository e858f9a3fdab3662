#!/usr/bin/env bash
# Builds the `quiver` container image FROM scratch.
#
#   deploy/build-image.sh [TAG]                  # default tag: quiver:dev
#   deploy/build-image.sh --binary PATH [TAG]    # package a binary built already
#
# Without --binary it builds a statically linked release binary (glibc,
# +crt-static) in target/static, so it does not disturb the normal build.
# With --binary it packages that binary as it is: a dynamically linked one
# goes in with the shared libraries `ldd` names, at the same paths (the test
# suite packages the binary it has just built instead of building Quiver a
# second time). Needs: cargo and gcc (ring's C code) without --binary, ldd,
# a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
if [[ "${1:-}" == "--binary" ]]; then
    binary="${2:?--binary needs a path}"
    shift 2
fi
tag="${1:-quiver:dev}"
if [[ -z "$binary" ]]; then
    target="$(rustc -vV | sed -n 's/^host: //p')"
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -p quiver-server --target "$target" --target-dir target/static
    binary="target/static/$target/release/quiver"
    # A static binary names no shared libraries ("statically linked" / "not
    # a dynamic executable").
    if ldd "$binary" 2>&1 | grep -q "=>"; then
        echo "error: $binary is dynamically linked" >&2
        exit 1
    fi
fi
[[ -x "$binary" ]] || { echo "error: $binary is not an executable" >&2; exit 1; }
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs"
cp "$binary" "$context/rootfs/quiver"
strip --strip-debug "$context/rootfs/quiver" 2>/dev/null || true
# The loader and libraries of a dynamic binary (none for a static one):
# every absolute path ldd prints, "libc.so.6 => /lib/.../libc.so.6 (0x..)"
# and "/lib64/ld-linux-x86-64.so.2 (0x..)" alike.
for lib in $(ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' || true); do
    cp --parents -L "$lib" "$context/rootfs/"
done
cp deploy/Dockerfile "$context/Dockerfile"
docker build -q -t "$tag" "$context" >/dev/null
echo "$tag"
