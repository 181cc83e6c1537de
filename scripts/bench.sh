#!/usr/bin/env bash
# Side-by-side benchmark: Tally, Redis and etcd on one workload.
#
#   scripts/bench.sh [--smoke] [--duration 120s] [--only PHASES]
#
# Installs redis-server and etcd-server (Debian packages) if missing, builds
# Tally, then for each system in turn — Tally (3 nodes, RF 3, acks after
# quorum commit of fsync'd logs), Redis with pipelined INCR (an upper bound
# that does less work), Redis with Tally's semantics (Lua: SET NX EX dedup +
# HINCRBY of minute/hour/day/month buckets), etcd (3 members, a durable put
# per event, batched into transactions) — starts it on loopback, runs the
# SAME `tally bench` workload through that system's target adapter (first as
# fast as it goes, then at 50% of that rate for latency), samples CPU time
# and peak RSS of its server processes from /proc, and stops it. Results go
# to docs/BENCHMARKS.md (markdown table + JSON block) with the machine,
# versions and settings.
#
# --smoke: dev build (`cargo build --workspace --all-targets`), a few
# seconds per run, results to a temp file; exits non-zero only if a system
# fails to start or a target fails to run at all. No assertions on speed:
# benchmarks are not timed tests.
#
# Tally alone is also measured for what the comparison cannot show:
# * reads under load: the 50% run adds 50 queries/s (a linearizable 30-day
#   Stats and a 2-hour minute Series, alternately) and 20 probes/s of the
#   delay from an event's ack to its visibility in a stale read on a
#   follower (`tally bench --query-rate --visibility-rate`), and where the
#   time goes: every node's per-stage latencies over that run (`tally
#   cluster stages`: queue wait, entry build, Raft write, log write, fsync,
#   apply, checkpoint, read stages);
# * failover: a fresh cluster under 50% ingest; 20 times (2 in --smoke)
#   kill -9 of the node leading the most partitions, the time from the kill
#   to the first acknowledged write on each partition it led (`tally
#   probe-writes`), then the victim restarted and every leader back;
# * idle cost: a fresh cluster of 1000 partitions (64 in --smoke) and no
#   load: time from start to every partition led, CPU and peak RSS per node,
#   once with quiescence (the default), once with it off (`tallyd
#   --quiesce-after-ms 0`), and once with 10,000 partitions (not in --smoke).
#
# --only PHASES: a comma-separated subset of tally, failover, idle,
# idle-large, redis-incr, redis-dedup, etcd (e.g. `--only failover,idle-large`
# to re-measure failover and the 10,000-partition start); the report then
# goes to a temp file, not docs/BENCHMARKS.md, which only a full run rewrites.
#
# Environment: BENCH_CONCURRENCY (producer tasks, 8), BENCH_INFLIGHT (batches
# in flight for redis/etcd, 32), BENCH_FAILOVER_KILLS (20),
# BENCH_FAILOVER_RATE (events/s during the kills; default half of the tally
# phase's saturated rate, which `--only failover` alone lacks),
# BENCH_TALLYD_ARGS (extra tallyd flags for every Tally cluster, e.g.
# `--election-timeout-ms 300` to compare settings side by side), BENCH_KEEP=1
# (keep the work directory).
set -euo pipefail
source "$(dirname "$0")/env.sh"

SMOKE=""
ONLY=""
DURATION=120s
while (($#)); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --duration) DURATION="${2:?--duration needs a value}"; shift ;;
    --duration=*) DURATION="${1#*=}" ;;
    --only) ONLY="${2:?--only needs a comma-separated list}"; shift ;;
    --only=*) ONLY="${1#*=}" ;;
    -h|--help) sed -n '2,50p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$SMOKE" && "$DURATION" == 120s ]] && DURATION=3s

# The workload, identical for every system.
IDS=1000000
ZIPF=1.1
TYPES="view=8,like=1,comment=1"
DUPLICATES=0.01
SPREAD=2h
CONCURRENCY="${BENCH_CONCURRENCY:-8}"
INFLIGHT="${BENCH_INFLIGHT:-32}"
SEED=42
TALLY_PARTITIONS=64
# Tally-only phases (see the header).
READ_FLAGS=(--query-rate 50 --visibility-rate 20)
if [[ -n "$SMOKE" ]]; then
  FAILOVER_KILLS=2 FAILOVER_KILL_AFTER=3 FAILOVER_SETTLE=1 IDLE_PARTITIONS=64 IDLE_SAMPLE=3 IDLE_SETTLE=1
else
  FAILOVER_KILLS="${BENCH_FAILOVER_KILLS:-20}" FAILOVER_KILL_AFTER=8 FAILOVER_SETTLE=3 IDLE_PARTITIONS=1000 IDLE_SAMPLE=20 IDLE_SETTLE=5
  IDLE_PARTITIONS_LARGE=10000
fi
FAILOVER_PROBE_TIMEOUT=30s
IDLE_QUIESCE_WAIT=60 # seconds
TALLY_PORT=7101      # nodes serve clients on 7101-7103
TALLY_PEER_PORT=7111 # and talk Raft to each other on 7111-7113
REDIS_PORT=7201
ETCD_CLIENT_PORT=7301 # members use 7301-7303, peers 7311-7313

log() { echo "bench: $*" >&2; }

# --- prerequisites -----------------------------------------------------------
install_missing() {
  local need=()
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq || log "apt-get update failed; trying the install anyway"
    # policy-rc.d may or may not stop the packages' own services from
    # starting; ours use other ports either way.
    $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}
install_missing
"$TALLY_ROOT/scripts/setup.sh"

cd "$TALLY_ROOT"
if [[ -n "$SMOKE" ]]; then
  PROFILE=dev
  BIN_DIR="$CARGO_TARGET_DIR/debug"
  # Exactly the test command's build, so features unify as they do there.
  cargo build --workspace --all-targets
else
  PROFILE=release
  BIN_DIR="$CARGO_TARGET_DIR/release"
  cargo build --release --workspace --bins
fi
TALLY="$BIN_DIR/tally"
TALLYD="$BIN_DIR/tallyd"

# --- bookkeeping and cleanup -------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-bench.XXXXXX")"
STARTED=()        # every server pid this script started (tally's via cluster.sh)
SERVER_PIDS=()    # the running system's server pids
FAILED=()

# RUN_PARTITIONS and RUN_EXTRA_ARGS (extra tallyd flags) override the
# cluster's settings for one phase.
RUN_PARTITIONS="" RUN_EXTRA_ARGS=""
tally_env() { env TALLY_HOME="$WORK/tally" TALLY_BASE_PORT="$TALLY_PORT" TALLY_PEER_BASE_PORT="$TALLY_PEER_PORT" TALLY_PROFILE="$PROFILE" \
  TALLY_PARTITIONS="${RUN_PARTITIONS:-$TALLY_PARTITIONS}" TALLY_EXTRA_ARGS="${BENCH_TALLYD_ARGS:-} $RUN_EXTRA_ARGS" \
  TALLY_NO_DEMO=1 TALLY_NO_BUILD=1 "$@"; }

cleanup() {
  local rc=$?
  set +e
  [[ -d "$WORK/tally" ]] && tally_env "$TALLY_ROOT/scripts/cluster.sh" down >/dev/null 2>&1
  local p
  for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${STARTED[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if [[ -z "${BENCH_KEEP:-}" ]]; then rm -rf "$WORK"; else log "work directory kept: $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_pids() {
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
}

# utime + stime (clock ticks) summed over the given pids.
cpu_ticks() {
  local total=0 p f a
  for p in "$@"; do
    # Field 2 (comm) may hold spaces; strip through its closing parenthesis.
    f=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    read -r -a a <<<"$f"
    total=$((total + a[11] + a[12]))
  done
  echo "$total"
}
# Peak RSS (VmHWM, kB) per pid, comma-separated.
peak_rss() {
  local out=() p
  for p in "$@"; do out+=("$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)"); done
  (IFS=,; echo "${out[*]}")
}

# --- systems -----------------------------------------------------------------
# RUN_UP_GRACE (seconds): if cluster.sh gives up waiting for every partition
# to elect a leader (it waits 60 s, which many partitions on a small machine
# can exceed) but all three nodes run, wait this much longer before failing.
RUN_UP_GRACE=0
start_tally() {
  log "starting Tally: 3 nodes on 127.0.0.1:$TALLY_PORT-$((TALLY_PORT + 2)), RF 3, ${RUN_PARTITIONS:-$TALLY_PARTITIONS} partitions${RUN_EXTRA_ARGS:+, tallyd $RUN_EXTRA_ARGS}"
  BENCH_ADDR=(--addr "127.0.0.1:$TALLY_PORT,127.0.0.1:$((TALLY_PORT + 1)),127.0.0.1:$((TALLY_PORT + 2))")
  SERVER_PIDS=()
  local i up=1
  tally_env "$TALLY_ROOT/scripts/cluster.sh" up 3 >"$WORK/tally-up.log" 2>&1 || up=""
  for i in 1 2 3; do
    [[ -s "$WORK/tally/node$i.pid" ]] && SERVER_PIDS+=("$(cat "$WORK/tally/node$i.pid")")
  done
  ((${#SERVER_PIDS[@]})) && STARTED+=("${SERVER_PIDS[@]}")
  if [[ -z "$up" && "$RUN_UP_GRACE" -gt 0 && ${#SERVER_PIDS[@]} -eq 3 ]] && kill -0 "${SERVER_PIDS[@]}" 2>/dev/null; then
    log "not every partition has a leader yet; waiting up to ${RUN_UP_GRACE}s more"
    "$TALLY" "${BENCH_ADDR[@]}" cluster wait --timeout "${RUN_UP_GRACE}s" >>"$WORK/tally-up.log" 2>&1 && up=1
  fi
  [[ -n "$up" ]] || { cat "$WORK/tally-up.log" >&2; return 1; }
}
stop_tally() { tally_env "$TALLY_ROOT/scripts/cluster.sh" down >/dev/null 2>&1 || true; rm -rf "$WORK/tally"; }

start_redis() {
  log "starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence, no replication)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize no \
    --logfile "$WORK/redis.log" --dir "$WORK" &
  SERVER_PIDS=($!)
  STARTED+=("${SERVER_PIDS[@]}")
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    kill -0 "${SERVER_PIDS[0]}" 2>/dev/null || { tail -5 "$WORK/redis.log" >&2; return 1; }
    sleep 0.1
  done
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || { log "redis did not answer"; return 1; }
  BENCH_ADDR=(--target-addr "127.0.0.1:$REDIS_PORT")
}
stop_redis() { stop_pids "${SERVER_PIDS[@]}"; }

ETCD_FLAGS=(--max-txn-ops 128 --quota-backend-bytes 8589934592 --snapshot-count 100000)
start_etcd() {
  local i cluster="" endpoints=""
  for i in 1 2 3; do
    cluster+="${cluster:+,}m$i=http://127.0.0.1:$((ETCD_CLIENT_PORT + 9 + i))"
    endpoints+="${endpoints:+,}127.0.0.1:$((ETCD_CLIENT_PORT + i - 1))"
  done
  log "starting etcd: 3 members, clients on $endpoints"
  SERVER_PIDS=()
  for i in 1 2 3; do
    local client="http://127.0.0.1:$((ETCD_CLIENT_PORT + i - 1))" peer="http://127.0.0.1:$((ETCD_CLIENT_PORT + 9 + i))"
    etcd --name "m$i" --data-dir "$WORK/etcd/m$i" \
      --listen-client-urls "$client" --advertise-client-urls "$client" \
      --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token tally-bench \
      --logger zap --log-level warn "${ETCD_FLAGS[@]}" >"$WORK/etcd-m$i.log" 2>&1 &
    SERVER_PIDS+=($!)
  done
  STARTED+=("${SERVER_PIDS[@]}")
  for _ in $(seq 1 150); do
    ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --dial-timeout 1s endpoint health >/dev/null 2>&1 && break
    for i in 0 1 2; do kill -0 "${SERVER_PIDS[$i]}" 2>/dev/null || { tail -5 "$WORK/etcd-m$((i + 1)).log" >&2; return 1; }; done
    sleep 0.2
  done
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --dial-timeout 1s endpoint health >/dev/null 2>&1 || { log "etcd did not become healthy"; return 1; }
  BENCH_ADDR=(--target-addr "$endpoints")
}
stop_etcd() { stop_pids "${SERVER_PIDS[@]}"; rm -rf "$WORK/etcd"; }

# --- one target --------------------------------------------------------------
# run_target NAME TARGET SYSTEM: start SYSTEM, saturate, measure latency at
# 50% of the saturated rate, sample /proc, stop; writes $WORK/NAME.json.
run_target() {
  local name=$1 target=$2 system=$3
  if ! "start_$system"; then
    log "$name: the system did not start"; FAILED+=("$name"); "stop_$system"; return
  fi
  local common=(bench --target "$target" "${BENCH_ADDR[@]}" --json --duration "$DURATION" --ids "$IDS" --zipf "$ZIPF"
    --types "$TYPES" --duplicates "$DUPLICATES" --time-spread "$SPREAD" --concurrency "$CONCURRENCY"
    --inflight "$INFLIGHT" --seed "$SEED")
  # Reads beside the writes are Tally's alone (the peers have no such API).
  local half_extra=()
  [[ "$target" == tally ]] && half_extra=("${READ_FLAGS[@]}")
  local t0 t1 w0 w1 rc=0 ok=1
  log "$name: saturation run ($DURATION, as fast as it goes)"
  t0=$(cpu_ticks "${SERVER_PIDS[@]}"); w0=$(date +%s.%N)
  "$TALLY" "${common[@]}" --rate 0 --no-verify --out "$WORK/$name-max.json" >"$WORK/$name-max.out" 2>"$WORK/$name-max.err" || rc=$?
  t1=$(cpu_ticks "${SERVER_PIDS[@]}"); w1=$(date +%s.%N)
  if ((rc != 0 && rc != 3)) || [[ ! -s "$WORK/$name-max.json" ]]; then
    log "$name: saturation run failed (exit $rc):"; tail -5 "$WORK/$name-max.err" >&2; ok=""
  fi
  local max="0"
  [[ -n "$ok" ]] && max=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["throughput_eps"])' "$WORK/$name-max.json")
  local half
  half=$(python3 -c 'import sys; print(max(1.0, float(sys.argv[1]) / 2))' "$max")
  rc=0
  if [[ -n "$ok" ]]; then
    log "$name: latency run at $half events/s (50% of $max)${half_extra[*]:+ with ${half_extra[*]}}"
    # Tally's per-stage latencies cover the 50% run alone: a new window now.
    [[ "$target" == tally ]] && { "$TALLY" "${BENCH_ADDR[@]}" cluster stages --reset >/dev/null 2>&1 || true; }
    "$TALLY" "${common[@]}" ${half_extra[@]+"${half_extra[@]}"} --rate "$half" --out "$WORK/$name-half.json" >"$WORK/$name-half.out" 2>"$WORK/$name-half.err" || rc=$?
    [[ "$target" == tally ]] && { "$TALLY" "${BENCH_ADDR[@]}" --json cluster stages >"$WORK/$name-stages.json" 2>/dev/null || true; }
    if ((rc != 0 && rc != 3)) || [[ ! -s "$WORK/$name-half.json" ]]; then
      log "$name: latency run failed (exit $rc):"; tail -5 "$WORK/$name-half.err" >&2; ok=""
    fi
  fi
  local rss
  rss=$(peak_rss "${SERVER_PIDS[@]}")
  "stop_$system"
  python3 - "$WORK" "$name" "$target" "$system" "$((t1 - t0))" "$(getconf CLK_TCK)" "$w0" "$w1" "$rss" "${ok:-0}" <<'PY'
import json, os, sys
work, name, target, system, ticks, hz, w0, w1, rss, ok = sys.argv[1:]
def load(suffix):
    p = os.path.join(work, f"{name}-{suffix}.json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
mx, half = load("max"), load("half")
cpu_s = int(ticks) / int(hz)
sent = (mx or {}).get("sent", 0)
acked = 0
if mx:
    o = mx["outcomes"]
    acked = o["accepted"] + o["duplicates"]
res = {
    "name": name, "target": target, "system": system, "ran": ok == "1" and acked > 0,
    "max_eps": mx and mx["throughput_eps"],
    "max_run": mx and {k: mx[k] for k in ("elapsed_s", "sent", "outcomes", "latency_ms")},
    # `tally bench`'s own CPU per event in the saturation run.
    "generator_cpu_us_per_event": mx and mx.get("generator_cpu_us_per_event"),
    "half_rate_eps": half and half["config"]["rate"],
    "half_run": half and {k: half.get(k) for k in ("elapsed_s", "sent", "throughput_eps", "outcomes", "latency_ms",
                                                  "verify", "verify_skipped", "ok", "query_latency_ms",
                                                  "visibility_ms")},
    "latency_ms": half and half["latency_ms"],
    # Tally only (null for the peers): reads during the 50% run.
    "query_latency_ms": half and half.get("query_latency_ms"),
    "visibility_ms": half and half.get("visibility_ms"),
    "server_cpu_s": cpu_s,
    "cpu_s_per_million_events": (cpu_s / sent * 1e6) if sent else None,
    "peak_rss_kb_per_process": [int(x) for x in rss.split(",") if x],
    "verified": None if not half or half.get("verify") is None else half["verify"]["ok"],
    "verify_skipped": half and half.get("verify_skipped"),
    # Tally only: `tally cluster stages` over the 50% run, every node.
    "stages_half_run": load("stages"),
}
with open(os.path.join(work, f"{name}.json"), "w") as f:
    json.dump(res, f, indent=2)
PY
  if ! python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ran"] else 1)' "$WORK/$name.json"; then
    log "$name: no event was acknowledged"; FAILED+=("$name")
  fi
}

# --- Tally alone: failover ---------------------------------------------------
# A fresh cluster under 50% of Tally's saturated rate. FAILOVER_KILLS times:
# kill -9 the node that leads the most partitions, time per partition it led
# the first acknowledged write after the kill (`tally probe-writes` through
# the two survivors, measured from the kill), restart the victim and wait
# until every partition has a leader again. Victims differ from kill to kill
# (a restarted node leads nothing until the next kill picks another). Writes
# $WORK/failover.json: every partition's time over all kills (p50/p99/max,
# the same nearest-rank percentiles as probe-writes) and each kill's.
run_failover() {
  local max half="${BENCH_FAILOVER_RATE:-}"
  if [[ -z "$half" ]]; then
    max=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("max_eps") or 0)' "$WORK/tally.json" 2>/dev/null || echo 0)
    if [[ "$max" == 0 ]]; then log "failover: skipped (Tally's saturation run gave no rate; run the tally phase or set BENCH_FAILOVER_RATE)"; return; fi
    half=$(python3 -c 'import sys; print(max(1.0, float(sys.argv[1]) / 2))' "$max")
  fi
  if ! start_tally; then log "failover: the cluster did not start"; FAILED+=(failover); stop_tally; return; fi
  # About long enough for every kill (probe, restart, every leader back).
  local run_s=$((FAILOVER_KILL_AFTER + FAILOVER_KILLS * 12))
  log "failover: ingest at $half events/s; $FAILOVER_KILLS kills -9 of the busiest leader, the first after ${FAILOVER_KILL_AFTER}s"
  "$TALLY" bench "${BENCH_ADDR[@]}" --json --rate "$half" --duration "${run_s}s" --no-verify --ids "$IDS" \
    --zipf "$ZIPF" --types "$TYPES" --duplicates "$DUPLICATES" --time-spread "$SPREAD" --concurrency "$CONCURRENCY" \
    --seed "$SEED" --out "$WORK/failover-bench.json" >"$WORK/failover-bench.out" 2>"$WORK/failover-bench.err" &
  local bench_pid=$! k victim led rc
  sleep "$FAILOVER_KILL_AFTER"
  rm -f "$WORK"/failover-probe-*.json
  for ((k = 1; k <= FAILOVER_KILLS; k++)); do
    victim="" led="" rc=0
    if "$TALLY" "${BENCH_ADDR[@]}" cluster status --json >"$WORK/failover-status.json" 2>"$WORK/failover-status.err"; then
      # "NODE P1,P2,...": the node leading the most partitions and those partitions.
      read -r victim led < <(python3 - "$WORK/failover-status.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
nodes = [n for n in doc.get("nodes", []) if n.get("reachable")]
if nodes:
    v = max(nodes, key=lambda n: n.get("leads", 0))["node_id"]
    led = [p["partition"] for p in doc.get("partitions", []) if p.get("leader") == v]
    if led:
        print(v, ",".join(map(str, led)))
PY
      ) || true
    fi
    if [[ -z "$victim" ]]; then
      log "failover: kill $k: no node leads a partition; see $WORK/failover-status.err"; FAILED+=(failover); break
    fi
    local survivors="" i t_kill
    for i in 1 2 3; do [[ "$i" != "$victim" ]] && survivors+="${survivors:+,}127.0.0.1:$((TALLY_PORT + i - 1))"; done
    t_kill=$(date +%s%3N)
    kill -KILL "$(cat "$WORK/tally/node$victim.pid")" || log "failover: node $victim was already gone"
    "$TALLY" --addr "$survivors" probe-writes --partitions "$led" --since "$t_kill" --timeout "$FAILOVER_PROBE_TIMEOUT" \
      --json >"$WORK/failover-probe-$k.json" 2>"$WORK/failover-probe.err" || rc=$?
    # Exit 2: some partition never took a write; that is a result, not a failure to run.
    if ((rc != 0 && rc != 2)) || [[ ! -s "$WORK/failover-probe-$k.json" ]]; then
      log "failover: kill $k: probe-writes failed (exit $rc):"; tail -5 "$WORK/failover-probe.err" >&2; FAILED+=(failover); break
    fi
    log "failover: kill $k of $FAILOVER_KILLS: node $victim (led $(tr -cd , <<<"$led" | wc -c | awk '{print $1 + 1}') partitions)"
    # Back to three nodes and a leader everywhere before the next kill.
    tally_env "$TALLY_ROOT/scripts/cluster.sh" restart "$victim" >>"$WORK/failover-restart.log" 2>&1 || true
    SERVER_PIDS=()
    for i in 1 2 3; do [[ -s "$WORK/tally/node$i.pid" ]] && SERVER_PIDS+=("$(cat "$WORK/tally/node$i.pid")"); done
    STARTED+=("${SERVER_PIDS[@]}")
    "$TALLY" "${BENCH_ADDR[@]}" cluster wait --timeout 60s >>"$WORK/failover-restart.log" 2>&1 ||
      { log "failover: not every partition had a leader 60 s after restarting node $victim"; FAILED+=(failover); break; }
    sleep "$FAILOVER_SETTLE"
  done
  wait "$bench_pid" || log "failover: the background ingest exited with $? (see $WORK/failover-bench.err)"
  stop_tally
  python3 - "$WORK" "$half" "$FAILOVER_KILL_AFTER" "$FAILOVER_KILLS" <<'PY'
import glob, json, math, os, sys
work, half, kill_after, wanted = sys.argv[1:]
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
probes = []
for path in sorted(glob.glob(os.path.join(work, "failover-probe-*.json")), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
    p = load(path)
    if p:
        probes.append(p)
def nearest_rank(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]
# Every partition's time to its first acknowledged write, over every kill.
times = [r["first_ack_ms"] for p in probes for r in p.get("partitions", []) if r.get("first_ack_ms") is not None]
bench = load(os.path.join(work, "failover-bench.json"))
res = {
    "ran": bool(probes), "kills": len(probes), "kills_wanted": int(wanted), "ingest_rate_eps": float(half),
    "first_kill_after_s": float(kill_after),
    "probe_timeout_s": probes[0]["timeout_s"] if probes else None,
    "first_ack_after_kill_ms": {"count": len(times), "p50": nearest_rank(times, 0.50), "p99": nearest_rank(times, 0.99),
                                "max": max(times) if times else None},
    "per_kill": [{"partitions_led": p["probed"], "first_ack_ms": p["first_ack_ms"], "never_acknowledged": p["failed"]}
                 for p in probes],
    "never_acknowledged": sum(p["failed"] for p in probes) if probes else None,
    "partition_count": probes[0]["partition_count"] if probes else None,
    "ingest_outcomes": bench and bench["outcomes"],
    "ingest_latency_ms": bench and bench["latency_ms"],
}
with open(os.path.join(work, "failover.json"), "w") as f:
    json.dump(res, f, indent=2)
PY
}

# --- Tally alone: idle cost -------------------------------------------------
# run_idle LABEL PARTITIONS [TALLYD FLAGS]: a fresh cluster of PARTITIONS
# partitions and no load. With quiescence on, wait until every node reports
# all its replicas quiesced (or IDLE_QUIESCE_WAIT s); with it off, settle a
# moment. Then CPU per node over IDLE_SAMPLE s and peak RSS per node.
# Writes $WORK/idle-LABEL.json.
run_idle() {
  local label=$1
  RUN_PARTITIONS=$2 RUN_EXTRA_ARGS=${3:-} RUN_UP_GRACE=240
  local t_start elected_ms
  t_start=$(date +%s%3N)
  # From starting the processes to every partition led (cluster.sh up waits).
  if start_tally; then elected_ms=$(($(date +%s%3N) - t_start)); else elected_ms=""; fi
  if [[ -z "$elected_ms" ]]; then
    log "idle ($label): the cluster did not start"; FAILED+=("idle-$label"); stop_tally
    RUN_PARTITIONS="" RUN_EXTRA_ARGS="" RUN_UP_GRACE=0; return
  fi
  local w0 waited quiet=0
  w0=$(date +%s)
  if [[ -z "$RUN_EXTRA_ARGS" ]]; then
    log "idle ($label): waiting up to ${IDLE_QUIESCE_WAIT}s for every replica to quiesce"
    while (($(date +%s) - w0 < IDLE_QUIESCE_WAIT)); do
      if "$TALLY" "${BENCH_ADDR[@]}" cluster status --json >"$WORK/idle-$label-status.json" 2>/dev/null &&
        python3 -c '
import json, sys
nodes = json.load(open(sys.argv[1])).get("nodes", [])
sys.exit(0 if nodes and all(n.get("quiesced") == n.get("replicas") for n in nodes) else 1)' "$WORK/idle-$label-status.json"; then
        quiet=1; break
      fi
      sleep 1
    done
  else
    sleep "$IDLE_SETTLE"
  fi
  waited=$(($(date +%s) - w0))
  log "idle ($label): sampling CPU for ${IDLE_SAMPLE}s"
  local before=() after=() p
  for p in "${SERVER_PIDS[@]}"; do before+=("$(cpu_ticks "$p")"); done
  sleep "$IDLE_SAMPLE"
  for p in "${SERVER_PIDS[@]}"; do after+=("$(cpu_ticks "$p")"); done
  local rss
  rss=$(peak_rss "${SERVER_PIDS[@]}")
  "$TALLY" "${BENCH_ADDR[@]}" cluster status --json >"$WORK/idle-$label-status.json" 2>/dev/null || true
  stop_tally
  python3 - "$WORK" "$label" "$RUN_PARTITIONS" "$RUN_EXTRA_ARGS" "$waited" "$quiet" "$IDLE_SAMPLE" "$(getconf CLK_TCK)" \
    "$(IFS=,; echo "${before[*]}")" "$(IFS=,; echo "${after[*]}")" "$rss" "$elected_ms" <<'PY'
import json, os, sys
work, label, partitions, extra, waited, quiet, sample, hz, before, after, rss, elected_ms = sys.argv[1:]
ints = lambda s: [int(x) for x in s.split(",") if x]
try:
    with open(os.path.join(work, f"idle-{label}-status.json")) as f:
        nodes = json.load(f).get("nodes", [])
except (OSError, ValueError):
    nodes = []
res = {
    "label": label, "partitions": int(partitions), "tallyd_flags": extra, "sample_s": float(sample),
    "start_to_all_leaders_s": round(int(elected_ms) / 1000, 1),
    "waited_s": int(waited), "all_quiesced_before_sample": quiet == "1" if not extra else None,
    "quiesced_per_node": [n.get("quiesced") for n in nodes], "replicas_per_node": [n.get("replicas") for n in nodes],
    "cpu_pct_of_one_core_per_node": [round((a - b) / int(hz) / float(sample) * 100, 2)
                                     for b, a in zip(ints(before), ints(after))],
    "peak_rss_mib_per_node": [round(v / 1024, 1) for v in ints(rss)],
}
with open(os.path.join(work, f"idle-{label}.json"), "w") as f:
    json.dump(res, f, indent=2)
PY
  RUN_PARTITIONS="" RUN_EXTRA_ARGS="" RUN_UP_GRACE=0
}

# wanted PHASE: true unless --only leaves PHASE out.
wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }
wanted tally && run_target tally tally tally
wanted failover && run_failover
if wanted idle; then
  run_idle quiescence "$IDLE_PARTITIONS"
  run_idle no-quiescence "$IDLE_PARTITIONS" "--quiesce-after-ms 0"
fi
[[ -z "$SMOKE" ]] && wanted idle-large && run_idle quiescence-large "$IDLE_PARTITIONS_LARGE"
wanted redis-incr && run_target redis-incr redis-incr redis
wanted redis-dedup && run_target redis-dedup redis-dedup redis
wanted etcd && run_target etcd etcd etcd

# --- report ------------------------------------------------------------------
if [[ -n "$SMOKE" || -n "$ONLY" ]]; then
  OUT="$(mktemp "${TMPDIR:-/tmp}/tally-bench-partial.XXXXXX.md")"
else
  OUT="$TALLY_ROOT/docs/BENCHMARKS.md"
fi
MODEL=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
python3 - "$WORK" "$OUT" "${SMOKE:-0}" "$DURATION" "$PROFILE" "$(nproc)" "${MODEL:-unknown}" "$MEM_KB" \
  "$("$TALLYD" --version 2>&1 | head -1)" "$(redis-server --version 2>&1 | head -1)" "$(etcd --version 2>&1 | head -1)" \
  "$IDS" "$ZIPF" "$TYPES" "$DUPLICATES" "$SPREAD" "$CONCURRENCY" "$INFLIGHT" "$SEED" "$TALLY_PARTITIONS" \
  "${ETCD_FLAGS[*]}" "$(uname -sr)" <<'PY'
import datetime, json, os, sys
(work, out, smoke, duration, profile, nproc, model, mem_kb, v_tally, v_redis, v_etcd,
 ids, zipf, types, dups, spread, conc, inflight, seed, partitions, etcd_flags, kernel) = sys.argv[1:]
names = ["tally", "redis-incr", "redis-dedup", "etcd"]
rows = []
for n in names:
    try:
        with open(os.path.join(work, f"{n}.json")) as f:
            rows.append(json.load(f))
    except (OSError, ValueError):
        rows.append({"name": n, "ran": False})
by = {r["name"]: r for r in rows}
tally = by.get("tally", {})

def num(x, fmt="{:,.0f}"):
    return "—" if x is None else fmt.format(x)
def lat(r, q):
    l = r.get("latency_ms")
    return None if not l else l.get(q)
def ratio(a, b):
    return None if a in (None, 0) or b in (None, 0) else a / b
def peak(r):
    v = r.get("peak_rss_kb_per_process") or []
    return max(v) / 1024 if v else None

desc = {
    "tally": "Tally, 3 nodes, RF 3, ack after quorum commit of fsync'd logs",
    "redis-incr": "Redis, 1 node, pipelined INCR (no dedup, no buckets, no persistence)",
    "redis-dedup": "Redis, 1 node, Lua SET NX EX + 4× HINCRBY count/sum, pipelined (no persistence)",
    "etcd": "etcd, 3 members, a put per event in txns of ≤128, fsync'd",
}
lines = []
lines.append("| system | events/s at saturation | p50 ms | p99 ms | p99.9 ms | latency run: target (achieved) events/s | CPU-s per M events (servers) | generator CPU µs per event | peak RSS per process (MiB) | verified |")
lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    n = r["name"]
    if not r.get("max_eps"):
        lines.append(f"| {desc[n]} | failed | | | | | | | | |")
        continue
    rss = ", ".join(f"{v/1024:.0f}" for v in r.get("peak_rss_kb_per_process") or [])
    v = r.get("verified")
    ver = "yes" if v is True else ("MISMATCH" if v is False else f"no ({r.get('verify_skipped') or 'not run'})")
    lines.append(f"| {desc[n]} | {num(r['max_eps'])} | {num(lat(r,'p50'),'{:.2f}')} | {num(lat(r,'p99'),'{:.2f}')} | "
                 f"{num(lat(r,'p999'),'{:.2f}')} | {num(r.get('half_rate_eps'))} ({num((r.get('half_run') or {}).get('throughput_eps'))}) | "
                 f"{num(r.get('cpu_s_per_million_events'),'{:.1f}')} | {num(r.get('generator_cpu_us_per_event'),'{:.2f}')} | {rss} | {ver} |")
ratios = {}
rl = ["| Tally ÷ | throughput | p99 latency | CPU-s per M events | peak RSS per process |", "|---|---:|---:|---:|---:|"]
for r in rows:
    n = r["name"]
    if n == "tally":
        continue
    q = {
        "throughput": ratio(tally.get("max_eps"), r.get("max_eps")),
        "p99_latency": ratio(lat(tally, "p99"), lat(r, "p99")),
        "cpu_per_event": ratio(tally.get("cpu_s_per_million_events"), r.get("cpu_s_per_million_events")),
        "peak_rss": ratio(peak(tally), peak(r)),
    }
    ratios[n] = q
    rl.append(f"| {n} | {num(q['throughput'],'{:.2f}')} | {num(q['p99_latency'],'{:.2f}')} | "
              f"{num(q['cpu_per_event'],'{:.2f}')} | {num(q['peak_rss'],'{:.2f}')} |")

# Tally alone: reads under load, failover, idle cost.
def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
ms2 = lambda x: num(x, "{:.2f}")
tl = []
q, v = tally.get("query_latency_ms") or {}, tally.get("visibility_ms") or {}
if q or v:
    rates = ", ".join(([f"{q['rate']:g} queries/s, Stats and Series alternately"] if q else []) +
                      ([f"{v['rate']:g} visibility probes/s"] if v else []))
    tl.append(f"| Tally, during the 50% run ({rates}) | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | count | failed |")
    tl.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, what in (("stats", "Stats over 30 days"), ("series", "Series of minute buckets over 2 hours")):
        k = q.get(kind)
        if k:
            tl.append(f"| {what}, linearizable | {ms2(k.get('p50'))} | "
                      f"{ms2(k.get('p90'))} | {ms2(k.get('p99'))} | {ms2(k.get('p999'))} | {ms2(k.get('max'))} | "
                      f"{k.get('count')} | {k.get('errors')} errors |")
    if v:
        tl.append(f"| ack → visible in a stale read on a follower | {ms2(v.get('p50'))} | "
                  f"{ms2(v.get('p90'))} | {ms2(v.get('p99'))} | {ms2(v.get('p999'))} | {ms2(v.get('max'))} | "
                  f"{v.get('count')} | {v.get('timeouts')} timeouts, {v.get('errors')} errors |")
failover = load("failover.json")
fl = []
if failover and failover.get("ran"):
    fa = failover.get("first_ack_after_kill_ms") or {}
    led = [k["partitions_led"] for k in failover.get("per_kill", [])]
    fl.append(f"Failover: {failover['kills']} kills -9 (of {failover['kills_wanted']} planned) of the node leading the most "
              f"partitions ({min(led, default=0)}–{max(led, default=0)} of {failover['partition_count']}), each victim "
              f"restarted and every partition led again before the next kill, under ingest at "
              f"{failover['ingest_rate_eps']:,.0f} events/s. Time from a kill to the first acknowledged write on each "
              f"partition the victim led, over all {fa.get('count')} (partition, kill) pairs: p50 {ms2(fa.get('p50'))} ms, "
              f"p99 {ms2(fa.get('p99'))} ms, max {ms2(fa.get('max'))} ms; "
              f"never acknowledged within {failover['probe_timeout_s']:g} s: {failover['never_acknowledged']}. "
              f"Ack latency of the background ingest over its whole run: p99 {ms2((failover.get('ingest_latency_ms') or {}).get('p99'))} ms.")
elif failover is not None:
    fl.append("Failover: did not run (see the log).")
idle = [x for x in (load("idle-quiescence.json"), load("idle-no-quiescence.json"), load("idle-quiescence-large.json")) if x]
il = []
if idle:
    il.append(f"| idle cluster, no load | partitions | start → every partition led (s) | "
              f"replicas quiesced per node | CPU % of one core per node ({idle[0]['sample_s']:g} s) | peak RSS per node (MiB) |")
    il.append("|---|---:|---:|---:|---:|---:|")
    for r in idle:
        what = f"quiescence off (`tallyd {r['tallyd_flags']}`)" if r["tallyd_flags"] else "quiescence on (default)"
        qz = ", ".join(f"{a if a is not None else '?'}/{b}" for a, b in zip(r["quiesced_per_node"], r["replicas_per_node"]))
        il.append(f"| {what} | {r['partitions']:,} | {r.get('start_to_all_leaders_s', '—')} | {qz or '—'} | {', '.join(f'{c:.1f}' for c in r['cpu_pct_of_one_core_per_node'])} | "
                  f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib_per_node'])} |")
# Per-stage breakdown of the 50% run: per stage, samples summed over the
# nodes and the worst node's percentiles (a slow node is what acks wait for).
sl = []
stages_doc = tally.get("stages_half_run") or {}
stage_nodes = [n for n in stages_doc.get("nodes", []) if "stages" in n]
if stage_nodes:
    sl.append(f"| Tally, stage (50% run, {len(stage_nodes)} nodes: samples summed, worst node's figures) | samples | mean ms | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | what it times |")
    sl.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    by_name = {}
    for n in stage_nodes:
        for st in n["stages"]:
            by_name.setdefault(st["name"], []).append(st)
    for name_, sts in by_name.items():
        worst = max(sts, key=lambda x: x.get("p99_ms") or 0)
        sl.append(f"| `{name_}` | {sum(x.get('count') or 0 for x in sts):,} | {ms2(worst.get('mean_ms'))} | {ms2(worst.get('p50_ms'))} | "
                  f"{ms2(worst.get('p90_ms'))} | {ms2(worst.get('p99_ms'))} | {ms2(worst.get('p999_ms'))} | {ms2(worst.get('max_ms'))} | "
                  f"{worst.get('description', '')} |")
tally_only = {"reads_during_half_run": {"query_latency_ms": q or None, "visibility_ms": v or None},
              "failover": failover, "idle": idle}

now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
machine = {"nproc": int(nproc), "cpu_model": model, "mem_total_mib": int(mem_kb) // 1024, "kernel": kernel}
versions = {"tally": v_tally, "redis": v_redis, "etcd": v_etcd}
settings = {
    "smoke": smoke == "1", "duration_per_run": duration, "tally_profile": profile,
    "workload": {"ids": int(ids), "zipf": float(zipf), "types": types, "duplicates": float(dups),
                 "event_time_spread": spread, "seed": int(seed), "producer_tasks": int(conc)},
    "tally": {"nodes": 3, "replication_factor": 3, "partitions": int(partitions), "client_batch_events": 2000, "linger_ms": 5},
    "redis": {"flags": "--save '' --appendonly no", "batch_events": 1000, "batches_in_flight": int(inflight)},
    "etcd": {"members": 3, "flags": etcd_flags, "batch_events": 128, "batches_in_flight": int(inflight)},
}
doc = {"generated": now, "machine": machine, "versions": versions, "settings": settings, "results": rows,
       "ratios_tally_over": ratios, "tally_only": tally_only}

md = []
md.append("# Benchmarks" + (" (smoke run: seconds per system, numbers meaningless)" if smoke == "1" else ""))
md.append("")
md.append(f"Generated by `scripts/bench.sh{' --smoke' if smoke == '1' else ''}` on {now}. "
          "Every system ran the same `tally bench` workload through its target adapter, one system at a time, "
          "on loopback, with the load generator on the same machine.")
md.append("")
md.append(f"**Machine:** {nproc} CPUs ({model}), {int(mem_kb)//1024} MiB RAM, {kernel}.  ")
md.append(f"**Versions:** {v_tally}; {v_redis}; {v_etcd}.  ")
md.append(f"**Workload:** Zipf({zipf}) over {int(ids):,} entity ids, types {types}, every event with an event_id, "
          f"{float(dups)*100:g}% re-sent duplicates, event times uniform over the last {spread}, {conc} producer tasks, "
          f"seed {seed}; {duration} per run. Saturation run as fast as the system acknowledges; then a run at 50% of "
          "that rate for latency (measured from each event's scheduled send time, so corrected for coordinated omission).")
md.append("")
md.append("\n".join(lines))
md.append("")
md.append("\n".join(rl))
md.append("")
if tl or sl or fl or il:
    md.append("## Tally alone")
    md.append("")
    for block in (tl, sl, fl, il):
        if block:
            md.append("\n".join(block))
            md.append("")
md.append("How to read it:")
md.append("")
md.append("* events/s: events acknowledged per second in the saturation run (re-sent duplicates included).")
md.append("* Latency: ack latency of the 50% run; if its achieved rate falls short of the target, the system could "
          "not sustain half its burst rate and the latency includes the growing backlog.")
md.append("* Latency: ack latency of the 50% run. Tally and etcd acknowledge after a quorum has the write on disk; "
          "Redis acknowledges from memory.")
md.append("* Generator CPU µs per event: `tally bench`'s own CPU (getrusage) over the saturation run's sending phase, "
          "per event sent; it shares the machine with the servers, so every µs it spends is taken from them.")
md.append("* CPU-s per M events: utime+stime of all server processes (from /proc/<pid>/stat) during the saturation run, "
          "per million events sent. The load generator's own CPU is not included, but it shares the machine.")
md.append("* Peak RSS: VmHWM of each server process at the end of its runs.")
md.append("* Verified: counts queried back and compared with the acknowledged events (Tally: Stats; redis-dedup: "
          "month buckets via HGETALL). redis-incr does not dedup and etcd does not count, so they are not verified.")
md.append("* Ratios are Tally ÷ peer from the same run: above 1 means Tally is faster (throughput) or costlier "
          "(latency, CPU, memory).")
md.append("* Tally alone, reads: during the 50% run, `tally bench --query-rate 50` issued linearizable queries on the "
          "producers' keys (same Zipf), latency from each query's scheduled time; `--visibility-rate 20` wrote one event "
          "per probe to a fresh entity and, after its ack, polled a stale Stats on a follower of its partition every "
          "millisecond: the delay is ack → visible there.")
md.append("* Tally alone, failover: `tally probe-writes` writes one event at a time (raw gRPC, no client retries, 500 ms "
          "per attempt) to every partition the killed node led, through the survivors, until one is acknowledged: the "
          "next attempt 10 ms after a failure, or beside an attempt that has hung for 100 ms. Times run from just "
          "before the kill. If the background ingest's latency is high, the survivors were saturated and the probes "
          "queued behind it.")
md.append("* Tally alone, idle: a fresh cluster with no load, CPU (utime+stime) and peak RSS per tallyd, with quiescence "
          "on (sampled once every replica reports quiesced) and off.")
md.append("")
md.append(f"Settings: Tally {profile} build, 3 nodes, RF 3, {partitions} partitions, client batches of ≤2000 events, "
          f"5 ms linger. Redis `--save '' --appendonly no`, pipelines of ≤1000 commands, {inflight} in flight over ≤8 "
          f"connections. etcd `{etcd_flags}`, transactions of ≤128 puts, {inflight} in flight over 2 connections per member.")
md.append("")
md.append("```json")
md.append(json.dumps(doc, indent=2))
md.append("```")
md.append("")
# The hand-written analysis (what each change bought, what limits the
# targets) lives below a marker in the same file and survives a new run.
MARKER = "<!-- analysis: kept by scripts/bench.sh -->"
kept = ""
try:
    with open(out) as f:
        old = f.read()
    if MARKER in old:
        kept = old[old.index(MARKER):]
except OSError:
    pass
with open(out, "w") as f:
    f.write("\n".join(md))
    if kept:
        f.write("\n" + kept)
print("\n".join(lines))
print()
print("\n".join(rl))
for block in (tl, fl, il):
    if block:
        print()
        print("\n".join(block))
PY
log "results written to $OUT"
if ((${#FAILED[@]})); then
  log "failed to run: ${FAILED[*]}"
  exit 1
fi
