#!/usr/bin/env bash
# An order pipeline with one plugin of each data-path kind, on a throwaway
# single node:
#   partitioner  by-customer  (json-field-partitioner, field=customer): all of a
#                             customer's orders land in one partition, in order
#   serializer   order-schema (json-schema, schema.json): a bad order rejects
#                             its batch with the reason; nothing is appended
#   transform    by-country   (route, field=country): orders-de, orders-fr,
#                             everything else to orders-other
# It checks each of those claims and exits non-zero if one fails.
#
# Usage: examples/orders-pipeline/run.sh   (QUIVER=path/to/quiver to choose
# the binary; default: `quiver` on PATH, else a release build of this tree)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
on_failure() { q plugin list 2>/dev/null; q plugin logs by-country 2>/dev/null | tail -n 5; }
source "$here/../node.sh"

rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
# `quiver plugin build` prints the component's path first; cargo's output
# goes to a log shown only if a build fails.
build() {
    local out
    out=$(q plugin build "$root/plugins/$1" 2>>"$data/build.log") || { cat "$data/build.log" >&2; exit 1; }
    echo "$out" | head -n 1
}
partitioner="$(build json-field-partitioner)"
serializer="$(build json-schema)"
transform="$(build route)"
echo "== built the three plugins"

q plugin deploy by-customer "$partitioner" --kind partitioner --param field=customer
q plugin deploy order-schema "$serializer" --kind serializer --param "schema=$(cat "$here/schema.json")"
q topic create orders -p 4 -c partitioner=by-customer -c value.serializer=order-schema >/dev/null
for t in orders-de orders-fr orders-other; do q topic create "$t" -p 2 >/dev/null; done
q plugin deploy by-country "$transform" --kind transform --input orders \
    --output orders-de,orders-fr,orders-other --param field=country --param prefix=orders- \
    --param default=orders-other

q topic produce orders <"$here/orders.jsonl"
total=$(wc -l <"$here/orders.jsonl")
echo "== produced $total orders"

if out=$(echo '{"order":0,"customer":"cust-1","country":"de","amount":5}' | q topic produce orders 2>&1); then
    echo "a bad order was accepted" >&2; exit 1
fi
echo "== a bad order was refused: $out"

stored=$(q topic consume orders -o start:end | wc -l)
[[ "$stored" -eq "$total" ]] || { echo "orders holds $stored records, expected $total" >&2; exit 1; }

# Each customer's orders are in exactly one partition.
split=$(q topic consume orders -o start:end --format json |
    sed -E 's/.*"partition":([0-9]+).*customer\\":\\"([^\\]+)\\".*/\2 \1/' | sort -u |
    awk '{print $1}' | uniq -d)
[[ -z "$split" ]] || { echo "customers split over partitions: $split" >&2; exit 1; }
echo "== every customer's orders are in one partition of 'orders'"

for _ in $(seq 300); do
    routed=0
    for t in orders-de orders-fr orders-other; do routed=$((routed + $(q topic consume "$t" -o start:end | wc -l))); done
    [[ "$routed" -ge "$total" ]] && break
    sleep 0.1
done
[[ "$routed" -eq "$total" ]] || { echo "the transform routed $routed of $total orders" >&2; exit 1; }
for t in de fr; do
    wrong=$(q topic consume "orders-$t" -o start:end | grep -vc "\"country\":\"$t\"" || true)
    [[ "$wrong" -eq 0 ]] || { echo "orders-$t holds $wrong orders of another country" >&2; exit 1; }
done
echo "== the transform routed all $total orders: de $(q topic consume orders-de -o start:end | wc -l)," \
    "fr $(q topic consume orders-fr -o start:end | wc -l), other $(q topic consume orders-other -o start:end | wc -l)"
q plugin list
echo "== pipeline OK"
