#!/usr/bin/env bash
# A table kept as a changelog in a compacted topic, on a throwaway single
# node: customer profiles keyed by id, 20,000 updates and deletions of 500
# customers. A consumer that reads the topic from offset 0 rebuilds the
# table; the script checks it equals the source of truth (the last update of
# each customer, deleted ones absent) before and after compaction, that
# compaction left about one record per customer, and that deletions
# (tombstones) are gone once delete.retention.ms has passed. Next to it, the
# stateful `aggregate` transform keeps a running count and sum of each
# customer's orders in its durable state store (changelog `spend-state`) and
# emits them to the compacted topic `spend`; the broker is killed (-9) while
# it works, and the totals must still equal the orders exactly.
#
# Usage: examples/changelog/run.sh   (QUIVER=path/to/quiver to choose the
# binary; default: `quiver` on PATH, else a release build of this tree)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
on_failure() { q plugin list 2>/dev/null; q plugin logs spend 2>/dev/null | tail -n 5; }
source "$here/../node.sh"

q topic create profiles -p 3 -c cleanup.policy=compact -c segment.bytes=65536 -c delete.retention.ms=2000 >/dev/null

# The changelog: an update sets a customer's whole profile; about one change
# in twenty deletes the customer (a tombstone: no value), who may come back.
awk 'BEGIN {
    srand(7)
    for (i = 0; i < 20000; i++) {
        c = int(rand() * 500)
        if (rand() < 0.05) { printf "cust-%03d\tNULL\n", c; continue }
        printf "cust-%03d\t{\"id\":%d,\"email\":\"c%d.v%d@example.com\",\"tier\":\"%s\"}\n", c, c, c, i, (i % 3 ? "gold" : "free")
    }
}' >"$data/changes.tsv"
# The source of truth: each customer's last change, deleted ones dropped.
table() { awk -F '\t' '{ last[$1] = $2 } END { for (k in last) if (last[k] != "NULL") print k "\t" last[k] }' | sort; }
table <"$data/changes.tsv" >"$data/truth.tsv"
q topic produce profiles --key-sep '\t' --null-marker NULL <"$data/changes.tsv"
echo "== produced $(wc -l <"$data/changes.tsv") changes of $(cut -f1 "$data/changes.tsv" | sort -u | wc -l) customers"

rebuild() { q topic consume profiles -o start:end --key-sep '\t' --null-marker NULL; }
check() {
    rebuild | table >"$data/rebuilt.tsv"
    if ! diff -q "$data/truth.tsv" "$data/rebuilt.tsv" >/dev/null; then
        diff "$data/truth.tsv" "$data/rebuilt.tsv" | head >&2
        echo "the table rebuilt from offset 0 differs from the source of truth ($1)" >&2
        exit 1
    fi
}
check "before compaction"
echo "== a consumer from offset 0 rebuilds the table of $(wc -l <"$data/truth.tsv") customers"

q topic compact profiles
records=$(rebuild | wc -l)
customers=$(cut -f1 "$data/changes.tsv" | sort -u | wc -l)
[[ "$records" -le "$customers" ]] || { echo "$records records left for $customers customers" >&2; exit 1; }
check "after compaction"
echo "== compacted: $records records (one per customer, deleted ones as tombstones) hold the same table"

# Tombstones stay readable for delete.retention.ms after the first clean
# that kept them (so readers from the start see the deletion), then go.
sleep 2.5
q topic compact profiles >/dev/null
tombstones=$(rebuild | awk -F '\t' '$2 == "NULL"' | wc -l)
[[ "$tombstones" -eq 0 ]] || { echo "$tombstones tombstones outlived delete.retention.ms" >&2; exit 1; }
check "after the tombstones expired"
echo "== tombstones dropped after delete.retention.ms; $(rebuild | wc -l) records, the table unchanged"
q topic describe profiles | sed -n 1,5p

# Orders per customer, summed by the stateful aggregate transform.
rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
# Its first line is the component's path (read whole: `| head` could cut the
# command off with SIGPIPE under pipefail).
aggregate=$(q plugin build "$root/plugins/aggregate" 2>>"$data/build.log") || { cat "$data/build.log" >&2; exit 1; }
aggregate=${aggregate%%$'\n'*}
q topic create orders -p 3 >/dev/null
q topic create spend -p 3 -c cleanup.policy=compact >/dev/null
q plugin deploy spend "$aggregate" --kind transform --input orders --output spend --param field=amount
orders() {
    awk -v seed="$1" 'BEGIN { srand(seed); for (i = 0; i < 5000; i++)
        printf "cust-%03d\t{\"order\":%d,\"amount\":%d}\n", int(rand() * 500), i, 1 + int(rand() * 200) }'
}
orders 11 >"$data/orders.tsv"
q topic produce orders --key-sep '\t' <"$data/orders.tsv"
kill9_node # while the transform works on them
orders 12 >>"$data/orders.tsv"
q topic produce orders --key-sep '\t' < <(tail -n 5000 "$data/orders.tsv")
echo "== produced $(wc -l <"$data/orders.tsv") orders, the broker killed (-9) and restarted in between"
# Truth: each customer's order count and sum; the totals: each key's last
# output ({"count":N,"sum":S}).
awk -F '\t' '{ split($2, f, "\"amount\":"); n[$1]++; s[$1] += f[2] + 0 }
    END { for (k in n) printf "%s\t{\"count\":%d,\"sum\":%d}\n", k, n[k], s[k] }' "$data/orders.tsv" | sort >"$data/spend-truth.tsv"
totals() { q topic consume spend -o start:end --key-sep '\t' | table; }
for _ in $(seq 300); do
    totals >"$data/spend.tsv"
    diff -q "$data/spend-truth.tsv" "$data/spend.tsv" >/dev/null && break
    sleep 0.1
done
if ! diff -q "$data/spend-truth.tsv" "$data/spend.tsv" >/dev/null; then
    diff "$data/spend-truth.tsv" "$data/spend.tsv" | head >&2
    echo "the totals differ from the orders" >&2
    exit 1
fi
echo "== the aggregate's totals of $(wc -l <"$data/spend.tsv") customers equal their orders exactly"
q topic compact spend-state >/dev/null
state=$(q topic consume spend-state -o start:end --key-sep '\t' | grep -c '^cust-')
echo "== its state changelog 'spend-state', compacted: $state customers"
echo "== changelog OK"
