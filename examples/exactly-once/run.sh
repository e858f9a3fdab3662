#!/usr/bin/env bash
# A payments pipeline that must count every payment once, on a throwaway
# single node: payments arrive in transactions (`topic produce
# --transactional-id`, 100 per transaction), the `aggregate` transform,
# deployed `--guarantee exactly-once`, keeps each account's count and sum in
# its state store and emits the running totals to `balances`. The broker is
# killed (-9) twice while the transform works, and a payment producer is
# killed in the middle of a transaction (its open transaction is aborted at
# its timeout: those payments never happened). The script checks, reading
# `balances` read_committed, that every account's totals after each of its
# payments appear exactly once (no output repeated, none missing), that the
# last totals equal the committed payments exactly, and that the killed
# producer's payments are counted nowhere.
#
# Usage: examples/exactly-once/run.sh   (QUIVER=path/to/quiver to choose the
# binary; default: `quiver` on PATH, else a release build of this tree)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
on_failure() { q plugin describe balances 2>/dev/null; q plugin logs balances 2>/dev/null | tail -n 5; q transaction list 2>/dev/null; }
source "$here/../node.sh"

rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
# Its first line is the component's path (read whole: `| head` could cut the
# command off with SIGPIPE under pipefail).
aggregate=$(q plugin build "$root/plugins/aggregate" 2>>"$data/build.log") || { cat "$data/build.log" >&2; exit 1; }
aggregate=${aggregate%%$'\n'*}
q topic create payments -p 3 >/dev/null
q topic create balances -p 3 >/dev/null
q plugin deploy balances "$aggregate" --kind transform --input payments --output balances \
    --param field=amount --guarantee exactly-once

payments() {
    awk -v seed="$1" -v from="$2" 'BEGIN { srand(seed); for (i = 0; i < 6000; i++)
        printf "acct-%02d\t{\"payment\":%d,\"amount\":%d}\n", int(rand() * 40), from + i, 1 + int(rand() * 500) }'
}
produce() { q topic produce payments --key-sep '\t' --transactional-id "payments-writer" --transaction-size 100; }

payments 1 0 >"$data/committed.tsv"
produce <"$data/committed.tsv"
kill9_node # while the transform works on them
payments 2 6000 | tee -a "$data/committed.tsv" | produce
kill9_node
echo "== produced $(wc -l <"$data/committed.tsv") payments in transactions of 100, the broker killed (-9) twice"

# A producer that dies in the middle of a transaction: its payments are
# written but never committed; the coordinator aborts them at the
# transaction's timeout (2 s).
mkfifo "$data/pipe"
# The binary itself (not the `q` function, whose subshell a kill would miss).
"$QUIVER" topic produce payments --key-sep '\t' --transactional-id "crashed-writer" --transaction-size 1000000 \
    --transaction-timeout-ms 2000 --linger-ms 0 <"$data/pipe" >>"$data/crashed.log" 2>&1 &
crashed=$!
exec 3>"$data/pipe"
for i in $(seq 50); do printf 'acct-%02d\t{"payment":%d,"amount":100000}\n' $((i % 40)) $((100000 + i)) >&3; done
# (Read whole, then matched: `grep -q` would stop reading early.)
txn_state() { q transaction describe crashed-writer --format json 2>/dev/null | sed -n 's/.*"state": "\([^"]*\)".*/\1/p'; }
for _ in $(seq 100); do [[ "$(txn_state)" == ongoing ]] && break; sleep 0.1; done
kill -9 "$crashed"; wait "$crashed" 2>/dev/null || true
exec 3>&-
for _ in $(seq 100); do [[ "$(txn_state)" == complete-abort ]] && break; sleep 0.1; done
[[ "$(txn_state)" == complete-abort ]] || { echo "the killed producer's transaction was not aborted" >&2; exit 1; }
echo "== a producer killed in a transaction: aborted at its timeout (state $(txn_state))"

# Truth: each account's committed payments (count, sum); every total the
# transform may emit is the account's after one more of its payments.
awk -F '\t' '{ split($2, f, "\"amount\":"); n[$1]++; s[$1] += f[2] + 0 }
    END { for (k in n) printf "%s\t{\"count\":%d,\"sum\":%d}\n", k, n[k], s[k] }' "$data/committed.tsv" | sort >"$data/truth.tsv"
outputs() { q topic consume balances -o start:end --key-sep '\t' --isolation read-committed; }
last() { awk -F '\t' '{ last[$1] = $2 } END { for (k in last) print k "\t" last[k] }' | sort; }
for _ in $(seq 300); do
    outputs >"$data/outputs.tsv"
    last <"$data/outputs.tsv" >"$data/balances.tsv"
    diff -q "$data/truth.tsv" "$data/balances.tsv" >/dev/null && break
    sleep 0.2
done
if ! diff -q "$data/truth.tsv" "$data/balances.tsv" >/dev/null; then
    diff "$data/truth.tsv" "$data/balances.tsv" | head >&2
    echo "the balances differ from the committed payments" >&2
    exit 1
fi
echo "== the last balances of $(wc -l <"$data/balances.tsv") accounts equal their committed payments exactly"
total=$(wc -l <"$data/committed.tsv")
emitted=$(wc -l <"$data/outputs.tsv")
repeated=$(sort "$data/outputs.tsv" | uniq -d | wc -l)
[[ "$repeated" -eq 0 ]] || { echo "$repeated outputs were emitted twice" >&2; exit 1; }
[[ "$emitted" -eq "$total" ]] || { echo "$emitted outputs for $total payments" >&2; exit 1; }
echo "== read committed: $emitted outputs for $total payments, none repeated, none missing"
all=$(q topic consume balances -o start:end | wc -l)
echo "== read uncommitted: $all outputs (more than $emitted if a crash aborted a step: its outputs stay in the log, never committed)"
echo "== exactly-once OK"
