#!/usr/bin/env bash
# Archived-range query latency, side by side with the same ranges read from
# the nodes: a 3-node cluster (release build; BENCH_PROFILE=dev for the test
# command's) with an archive (a local directory), EVENTS events over IDS
# entities spread over the last 3 days; then `tally bench stats` asks, for
# the 200 most viewed entities, 10:07-16:05 UTC two days back (58 minute
# buckets and 5 hour buckets per entity): first while every bucket is on
# the nodes, then after `set-retention --archive-after 1d --keep-minutes 1h
# --keep-hours 1d` has archived them and dropped them from the nodes. Each
# run makes a cold pass (files not read yet) and a warm one (the archive's
# lease cache); the leaders' export time is summed from their logs.
#
#   scripts/bench-archive.sh [EVENTS]     (default 2,000,000)
#
# Environment: BENCH_IDS (100000), BENCH_PROFILE (release; dev uses the
# test command's build, whose tallyd and Parquet crates are optimised too),
# CARGO_TARGET_DIR.
set -euo pipefail
TALLY_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/tally-target}"
EVENTS="${1:-2000000}"
IDS="${BENCH_IDS:-100000}"
cd "$TALLY_ROOT"
PROFILE="${BENCH_PROFILE:-release}"
if [[ "$PROFILE" == dev ]]; then
  cargo build --workspace --all-targets
  TALLY="$CARGO_TARGET_DIR/debug/tally"
else
  cargo build --release --workspace --bins
  TALLY="$CARGO_TARGET_DIR/release/tally"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-archive.XXXXXX")"
cluster() { env TALLY_HOME="$WORK/tally" TALLY_BASE_PORT=7501 TALLY_PROFILE="$PROFILE" TALLY_NO_BUILD=1 TALLY_NO_DEMO=1 \
  TALLY_HTTP_BASE_PORT=off TALLY_EXTRA_ARGS="--archive-url $WORK/archive --archive-check-ms 1000 --retention-check-ms 1000" \
  "$TALLY_ROOT/scripts/cluster.sh" "$@"; }
trap 'cluster down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
cluster up >&2
ADDR=127.0.0.1:7501,127.0.0.1:7502,127.0.0.1:7503
echo "loading $EVENTS events over $IDS entities spread over the last 3 days" >&2
"$TALLY" --addr "$ADDR" bench --events "$EVENTS" --ids "$IDS" --zipf 0.8 --types view=8,like=1,comment=1 \
  --time-spread 72h --duplicates 0 --concurrency 8 --no-verify --out "$WORK/load.json" >&2
FROM="$(date -u -d '2 days ago' +%Y-%m-%dT10:07:00Z)"
TO="$(date -u -d '2 days ago' +%Y-%m-%dT16:05:00Z)"
ask() { "$TALLY" --addr "$ADDR" bench stats --type "${1:-view}" --from "$FROM" --to "$TO" --entities "${2:-200}"; }
echo "on the nodes:"
ask
"$TALLY" --addr "$ADDR" cluster set-retention --archive-after 1d --keep-minutes 1h --keep-hours 1d >&2
echo "waiting for every partition to archive and drop those buckets" >&2
for _ in $(seq 1 300); do
  left="$("$TALLY" --addr "$ADDR" --json cluster status | python3 -c \
    'import json,sys; print(sum(1 for p in json.load(sys.stdin)["partitions"] if not p.get("archived_upto_ms")))')"
  [[ "$left" == 0 ]] && break
  sleep 2
done
for _ in $(seq 1 300); do
  # Another type: the measured entities stay out of the cache until measured.
  if ask like 20 2>/dev/null | grep -q " [1-9][0-9]* archive buckets"; then break; fi
  sleep 2
done
# The expiry that dropped them (a pass over each partition) is done too.
sleep 10
echo "from the archive (files: $(find "$WORK/archive" -name '*.parquet' | wc -l), $(du -sh "$WORK/archive" | cut -f1)):"
ask
# What exporting cost the leaders: rows, bytes and time per segment, summed.
cat "$WORK"/tally/node*.log | grep ' archived' | sed 's/\x1b\[[0-9;]*m//g' | python3 -c '
import re, sys
rows = size = took = n = 0
for line in sys.stdin:
    f = dict(re.findall(r"(\w+)=(\d+)", line))
    if "rows" in f and "took_ms" in f:
        n += 1; rows += int(f["rows"]); size += int(f["bytes"]); took += int(f["took_ms"])
print(f"export: {n} segments, {rows} rows, {size / 2**20:.1f} MiB of Parquet, {took / 1000:.1f} s of leader time in all")'

