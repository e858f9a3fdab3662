#!/usr/bin/env bash
# Builds the `quiver` container image from this workspace: a statically
# linked release binary (glibc, +crt-static), copied alone into an image
# FROM scratch.
#
#   deploy/build-image.sh [TAG]        # default tag: quiver:dev
#
# The binary is built in target/static so it does not disturb the normal
# build. Needs: cargo, gcc (ring's C code), a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-quiver:dev}"
target="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p quiver-server --target "$target" --target-dir target/static
binary="target/static/$target/release/quiver"
# A static binary names no shared libraries ("statically linked" / "not a
# dynamic executable").
if ldd "$binary" 2>&1 | grep -q "=>"; then
    echo "error: $binary is dynamically linked" >&2
    exit 1
fi
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/quiver"
strip --strip-debug "$context/quiver" 2>/dev/null || true
cp deploy/Dockerfile "$context/Dockerfile"
docker build -q -t "$tag" "$context" >/dev/null
echo "$tag"
