# Sourced by the examples' run.sh: picks the quiver binary (QUIVER, else
# `quiver` on PATH, else a release build of this tree), starts a throwaway
# single node (`quiver dev`) in a temporary directory, and stops it and
# removes the directory on exit. Sets `root`, `data`, `port`, `node`, and
# `q` (runs the binary); `kill9_node` kills the node with SIGKILL and starts
# it again on the same data. An example may define `on_failure` to print what
# helps when one of its checks fails.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${QUIVER:-}" ]]; then
    if command -v quiver >/dev/null; then
        QUIVER=quiver
    else
        cargo build --release -q -p quiver-server --manifest-path "$root/Cargo.toml"
        QUIVER="$root/target/release/quiver"
    fi
fi
q() { "$QUIVER" "$@"; }

data="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
export QUIVER_DEV_DIR="$data"
start_node() {
    rm -f "$data/address"
    "$QUIVER" dev --data-dir "$data" --listen "127.0.0.1:$port" >>"$data/node.log" 2>&1 &
    node=$!
}
start_node
cleanup() {
    local status=$?
    if [[ $status -ne 0 ]] && declare -F on_failure >/dev/null; then on_failure || true; fi
    kill "$node" 2>/dev/null || true
    wait "$node" 2>/dev/null || true
    rm -rf "$data"
    exit "$status"
}
trap cleanup EXIT
for _ in $(seq 100); do [[ -s "$data/address" ]] && break; sleep 0.1; done
[[ -s "$data/address" ]] || { cat "$data/node.log"; echo "the node did not start" >&2; exit 1; }
echo "== node on 127.0.0.1:$port (data in $data)"

kill9_node() {
    kill -9 "$node"
    wait "$node" 2>/dev/null || true
    start_node
    for _ in $(seq 100); do [[ -s "$data/address" ]] && q topic list >/dev/null 2>&1 && return; sleep 0.1; done
    cat "$data/node.log"
    echo "the node did not come back" >&2
    exit 1
}
