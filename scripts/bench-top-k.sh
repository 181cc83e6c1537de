#!/usr/bin/env bash
# TopK latency on a loaded day: a 3-node release cluster, EVENTS events
# over IDS entities (default 1,000,000, Zipf 0.8 so most of them appear)
# spread over the last BENCH_SPREAD (18h: mostly today, UTC), then
# `tally bench top-k` asks for the top 10, 100 and 1,000 of today (one day
# bucket per partition) and of the last 24 hours (25 hour buckets), one
# query at a time, and prints their latency percentiles.
#
#   scripts/bench-top-k.sh [EVENTS]       (default 4,000,000)
#
# Environment: BENCH_IDS (1000000), BENCH_SPREAD (18h), BENCH_TOPK_REPEAT
# (50), CARGO_TARGET_DIR.
set -euo pipefail
TALLY_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/tally-target}"
EVENTS="${1:-4000000}"
IDS="${BENCH_IDS:-1000000}"
REPEAT="${BENCH_TOPK_REPEAT:-50}"
SPREAD="${BENCH_SPREAD:-18h}"
cd "$TALLY_ROOT"
cargo build --release --workspace --bins
TALLY="$CARGO_TARGET_DIR/release/tally"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-topk.XXXXXX")"
cluster() { env TALLY_HOME="$WORK/tally" TALLY_BASE_PORT=7401 TALLY_PROFILE=release TALLY_NO_BUILD=1 TALLY_NO_DEMO=1 \
  TALLY_HTTP_BASE_PORT=off "$TALLY_ROOT/scripts/cluster.sh" "$@"; }
trap 'cluster down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
cluster up >&2
ADDR=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
echo "loading $EVENTS events over $IDS entities spread over the last $SPREAD" >&2
"$TALLY" --addr "$ADDR" bench --events "$EVENTS" --ids "$IDS" --zipf 0.8 --types view=8,like=1,comment=1 \
  --time-spread "$SPREAD" --duplicates 0 --concurrency 8 --no-verify --out "$WORK/load.json" >&2
TODAY="$(date -u +%Y-%m-%dT00:00:00Z)"
TOMORROW="$(date -u -d tomorrow +%Y-%m-%dT00:00:00Z)"
for k in 10 100 1000; do
  echo "today ($TODAY .. $TOMORROW):"
  "$TALLY" --addr "$ADDR" bench top-k --type view --from "$TODAY" --to "$TOMORROW" -k "$k" --repeat "$REPEAT"
  echo "the last 24 hours:"
  "$TALLY" --addr "$ADDR" bench top-k --type view --from -24h --to +1m -k "$k" --repeat "$REPEAT"
done
