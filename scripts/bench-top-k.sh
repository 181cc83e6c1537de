#!/usr/bin/env bash
# TopK latency on a loaded day: a 3-node release cluster, a day of events
# over IDS entities (default 1,000,000, Zipf 0.8 so most of them appear),
# then `tally bench top-k` asks for the day's top 10, 100 and 1,000, one
# query at a time, and prints their latency percentiles.
#
#   scripts/bench-top-k.sh [EVENTS]       (default 4,000,000)
#
# Environment: BENCH_IDS (1000000), BENCH_TOPK_REPEAT (50), CARGO_TARGET_DIR.
set -euo pipefail
TALLY_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/tally-target}"
EVENTS="${1:-4000000}"
IDS="${BENCH_IDS:-1000000}"
REPEAT="${BENCH_TOPK_REPEAT:-50}"
cd "$TALLY_ROOT"
cargo build --release --workspace --bins
TALLY="$CARGO_TARGET_DIR/release/tally"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-topk.XXXXXX")"
cluster() { env TALLY_HOME="$WORK/tally" TALLY_BASE_PORT=7401 TALLY_PROFILE=release TALLY_NO_BUILD=1 TALLY_NO_DEMO=1 \
  TALLY_HTTP_BASE_PORT=off "$TALLY_ROOT/scripts/cluster.sh" "$@"; }
trap 'cluster down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
cluster up >&2
ADDR=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
echo "loading $EVENTS events over $IDS entities spread over the last 23 hours" >&2
"$TALLY" --addr "$ADDR" bench --events "$EVENTS" --ids "$IDS" --zipf 0.8 --types view=8,like=1,comment=1 \
  --time-spread 23h --duplicates 0 --concurrency 8 --no-verify --out "$WORK/load.json" >&2
for k in 10 100 1000; do
  "$TALLY" --addr "$ADDR" bench top-k --type view --from -1d --to +1h -k "$k" --repeat "$REPEAT"
done
