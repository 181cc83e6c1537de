#!/usr/bin/env bash
# Heavy skew, side by side: the same Zipf(1.3)-over-1M-ids workload (the top
# entity is about a quarter of all events) against a fresh 3-node cluster
# twice — automatic spreading off, then on (`tallyd --auto-spread-share`) —
# and per run the saturated throughput, the per-node CPU of the measured
# window and its spread (busiest node ÷ idlest). Events are "now"
# (`--time-spread 1s`): a spread moves an entity's events from the next
# minute its home has not counted, so it relieves real-time traffic, not a
# backfill of old times.
#
# Each run first loads for WARMUP; with spreading on, it goes on loading
# until the hot entities found are spread and their start has passed, so the
# measured window is the steady state either way. Called by
# `scripts/bench.sh --only skew`; alone:
#
#   scripts/bench-skew.sh [DURATION]     (default 60s)
#
# Environment: BENCH_PROFILE (release; dev = the test command's build),
# BENCH_SKEW_SHARE (0.3: the share of a partition's events that makes an
# entity hot), BENCH_SKEW_MIN_RATE (2000: events/s below which a partition
# is not busy), BENCH_SKEW_SPREADS (2: spreads to wait for before
# measuring), BENCH_SKEW_WAYS (4), BENCH_CONCURRENCY (8), CARGO_TARGET_DIR.
set -euo pipefail
TALLY_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/tally-target}"
DURATION="${1:-60s}"
WARMUP=30s
SHARE="${BENCH_SKEW_SHARE:-0.3}"
MIN_RATE="${BENCH_SKEW_MIN_RATE:-2000}"
SPREADS="${BENCH_SKEW_SPREADS:-2}"
WAYS="${BENCH_SKEW_WAYS:-4}"
CONCURRENCY="${BENCH_CONCURRENCY:-8}"
cd "$TALLY_ROOT"
PROFILE="${BENCH_PROFILE:-release}"
if [[ "$PROFILE" == dev ]]; then
  [[ -n "${TALLY_NO_BUILD:-}" ]] || cargo build --workspace --all-targets
  TALLY="$CARGO_TARGET_DIR/debug/tally"
else
  [[ -n "${TALLY_NO_BUILD:-}" ]] || cargo build --release --workspace --bins
  TALLY="$CARGO_TARGET_DIR/release/tally"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-skew.XXXXXX")"
ADDR=127.0.0.1:7601,127.0.0.1:7602,127.0.0.1:7603
EXTRA=""
cluster() { env TALLY_HOME="$WORK/tally" TALLY_BASE_PORT=7601 TALLY_PEER_BASE_PORT=7611 TALLY_PROFILE="$PROFILE" \
  TALLY_NO_BUILD=1 TALLY_NO_DEMO=1 TALLY_HTTP_BASE_PORT=off TALLY_EXTRA_ARGS="$EXTRA" \
  "$TALLY_ROOT/scripts/cluster.sh" "$@"; }
trap 'cluster down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

load() { # DURATION OUT
  "$TALLY" --addr "$ADDR" bench --duration "$1" --rate 0 --ids 1000000 --zipf 1.3 --types view=8,like=1,comment=1 \
    --time-spread 1s --duplicates 0.01 --concurrency "$CONCURRENCY" --seed 42 --entity-prefix skew --no-verify --json \
    --out "$2" >/dev/null
}
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# Whether SPREADS spreads are active and their start has passed.
spreads_settled() {
  "$TALLY" --addr "$ADDR" --json cluster status | python3 -c '
import json, sys, time
s = json.load(sys.stdin).get("spreads", [])
now = time.time() * 1000
sys.exit(0 if len(s) >= int(sys.argv[1]) and all(x["from_ms"] and x["from_ms"] < now for x in s) else 1)' "$SPREADS"
}

run() { # MODE
  local mode=$1
  EXTRA=""
  [[ "$mode" == on ]] && EXTRA="--auto-spread-share $SHARE --auto-spread-ways $WAYS --auto-spread-min-events-per-sec $MIN_RATE"
  cluster up >"$WORK/up-$mode.log" 2>&1 || { cat "$WORK/up-$mode.log" >&2; exit 1; }
  local pids=() i
  for i in 1 2 3; do pids+=("$(cat "$WORK/tally/node$i.pid")"); done
  echo "skew $mode: warming up ($WARMUP)" >&2
  load "$WARMUP" "$WORK/warmup-$mode.json"
  if [[ "$mode" == on ]]; then
    for _ in $(seq 1 16); do
      spreads_settled && break
      echo "skew on: waiting for the hot entities to be spread" >&2
      load 15s "$WORK/warmup-more.json"
    done
    "$TALLY" --addr "$ADDR" cluster status | grep '^spread:' >&2 || echo "skew on: nothing was spread" >&2
  fi
  local before=() after=()
  for i in 0 1 2; do before+=("$(ticks "${pids[$i]}")"); done
  local t0 t1
  t0=$(date +%s.%N)
  echo "skew $mode: measuring ($DURATION)" >&2
  load "$DURATION" "$WORK/run-$mode.json"
  t1=$(date +%s.%N)
  for i in 0 1 2; do after+=("$(ticks "${pids[$i]}")"); done
  # The partitions' load as their leaders saw it (smoothed over ~10 s).
  "$TALLY" --addr "$ADDR" --json cluster status --hot >"$WORK/hot-$mode.json" 2>/dev/null || echo '{}' >"$WORK/hot-$mode.json"
  python3 - "$mode" "$WORK/run-$mode.json" "$WORK/hot-$mode.json" "$t0" "$t1" "$(getconf CLK_TCK)" \
    "${before[0]}" "${after[0]}" "${before[1]}" "${after[1]}" "${before[2]}" "${after[2]}" <<'EOF' | tee -a "$WORK/summary"
import json, sys
mode, path, hot_path = sys.argv[1], sys.argv[2], sys.argv[3]
t0, t1, tck = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
ticks = [int(b) for b in sys.argv[7:]]
parts = json.load(open(hot_path)).get("partitions", [])
total = sum(p.get("events_per_sec", 0) for p in parts) or 1
top = max(parts, key=lambda p: p.get("events_per_sec", 0), default={})
secs = t1 - t0
cpu = [(ticks[2 * i + 1] - ticks[2 * i]) / tck / secs for i in range(3)]
run = json.load(open(path))
print(json.dumps({"mode": mode, "throughput_eps": round(run["throughput_eps"]), "node_cpu_cores": [round(c, 2) for c in cpu],
                  "cpu_max_over_min": round(max(cpu) / max(min(cpu), 1e-9), 2),
                  "p99_ms": run["latency_ms"].get("p99"),
                  "hottest_partition": top.get("partition"),
                  "hottest_partition_share": round(top.get("events_per_sec", 0) / total, 3),
                  "hottest_partition_cpu": round(top.get("processor_cpu", 0) + top.get("apply_cpu", 0), 3)}))
EOF
  cluster down >/dev/null 2>&1 || true
  rm -rf "$WORK/tally"
}

run off
run on
python3 - "$WORK/summary" <<'EOF'
import json, sys
runs = {r["mode"]: r for r in map(json.loads, open(sys.argv[1]))}
off, on = runs["off"], runs["on"]
print(f"throughput on / off: {on['throughput_eps'] / max(off['throughput_eps'], 1):.2f} "
      f"({on['throughput_eps']} / {off['throughput_eps']} events/s); "
      f"per-node CPU max/min: off {off['cpu_max_over_min']}, on {on['cpu_max_over_min']}; "
      f"hottest partition's share of events: off {off['hottest_partition_share']}, on {on['hottest_partition_share']}")
EOF
