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
# versions and settings. This script only starts, stops and samples; every
# result is read and the report rendered by `tally bench record …` and
# `tally bench report` (crate tally-bench, src/report/).
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
#   --quiesce-after-ms 0`), and once with 10,000 partitions (not in --smoke);
# * heavy skew: Zipf 1.3 over 1M ids, automatic spreading of hot entities
#   off vs on, throughput and per-node CPU (`scripts/bench-skew.sh`; not in
#   --smoke).
#
# --only PHASES: a comma-separated subset of tally, failover, idle,
# idle-large, redis-incr, redis-dedup, etcd, skew (e.g. `--only failover,idle-large`
# to re-measure failover and the 10,000-partition start); the report then
# goes to a temp file, not docs/BENCHMARKS.md, which only a full run rewrites.
#
# Environment: BENCH_CONCURRENCY (producer tasks, 8), BENCH_INFLIGHT (batches
# in flight for redis/etcd, 32), BENCH_FAILOVER_KILLS (20),
# BENCH_FAILOVER_RATE (events/s during the kills; default half of the tally
# phase's saturated rate, which `--only failover` alone lacks),
# BENCH_ACTORS (give Tally's events actor ids out of this many viewers, for
# the cost of unique counts), BENCH_RAW_LOG (turn on Tally's raw-event log
# with this many events per partition, for its cost), BENCH_TALLYD_ARGS
# (extra tallyd flags for every Tally cluster, e.g. `--election-timeout-ms
# 300` to compare settings side by side), BENCH_KEEP=1 (keep the work
# directory).
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
    -h|--help) sed -n '2,57p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
  # Unique-actor sketches on the ingest path, when asked for.
  [[ "$target" == tally && -n "${BENCH_ACTORS:-}" ]] && common+=(--actors "$BENCH_ACTORS")
  # The raw-event log on the ingest path, when asked for.
  if [[ "$target" == tally && -n "${BENCH_RAW_LOG:-}" ]]; then
    "$TALLY" "${BENCH_ADDR[@]}" cluster set-policy --raw-log-max-events "$BENCH_RAW_LOG" >>"$WORK/tally-up.log" 2>&1 \
      || log "$name: could not turn the raw-event log on"
  fi
  local t0 t1 rc=0 ok=1
  log "$name: saturation run ($DURATION, as fast as it goes)"
  t0=$(cpu_ticks "${SERVER_PIDS[@]}")
  "$TALLY" "${common[@]}" --rate 0 --no-verify --out "$WORK/$name-max.json" >"$WORK/$name-max.out" 2>"$WORK/$name-max.err" || rc=$?
  t1=$(cpu_ticks "${SERVER_PIDS[@]}")
  if ((rc != 0 && rc != 3)) || [[ ! -s "$WORK/$name-max.json" ]]; then
    log "$name: saturation run failed (exit $rc):"; tail -5 "$WORK/$name-max.err" >&2; ok=""
  fi
  local half=""
  if [[ -n "$ok" ]] && ! half=$("$TALLY" bench half-rate "$WORK/$name-max.json" 2>>"$WORK/$name-max.err"); then
    log "$name: the saturation run acknowledged nothing"; ok=""
  fi
  rc=0
  if [[ -n "$ok" ]]; then
    log "$name: latency run at $half events/s (50% of the saturation rate)${half_extra[*]:+ with ${half_extra[*]}}"
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
  # The record (WORK/NAME.json) from both runs' results and the samples.
  local failed_flag=()
  [[ -n "$ok" ]] || failed_flag=(--failed)
  "$TALLY" bench record target --work "$WORK" --name "$name" --target "$target" --system "$system" \
    --server-cpu-ticks "$((t1 - t0))" --clk-tck "$(getconf CLK_TCK)" --peak-rss-kb "$rss" ${failed_flag[@]+"${failed_flag[@]}"} ||
    { log "$name: no event was acknowledged"; FAILED+=("$name"); }
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
  local half="${BENCH_FAILOVER_RATE:-}"
  if [[ -z "$half" ]] && ! half=$("$TALLY" bench half-rate "$WORK/tally-max.json" 2>/dev/null); then
    log "failover: skipped (Tally's saturation run gave no rate; run the tally phase or set BENCH_FAILOVER_RATE)"; return
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
    # "NODE P1,P2,...": the node leading the most partitions and those partitions.
    read -r victim led < <("$TALLY" "${BENCH_ADDR[@]}" bench busiest-leader 2>"$WORK/failover-status.err") || true
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
  "$TALLY" bench record failover --work "$WORK" --rate "$half" --kill-after-s "$FAILOVER_KILL_AFTER" \
    --kills-wanted "$FAILOVER_KILLS"
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
      if "$TALLY" "${BENCH_ADDR[@]}" bench all-quiesced 2>/dev/null; then
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
  local quiesced_flag=()
  ((quiet)) && quiesced_flag=(--all-quiesced)
  "$TALLY" bench record idle --work "$WORK" --label "$label" --partitions "$RUN_PARTITIONS" \
    --tallyd-flags "$RUN_EXTRA_ARGS" --waited-s "$waited" ${quiesced_flag[@]+"${quiesced_flag[@]}"} \
    --sample-s "$IDLE_SAMPLE" --clk-tck "$(getconf CLK_TCK)" --cpu-ticks-before "$(IFS=,; echo "${before[*]}")" \
    --cpu-ticks-after "$(IFS=,; echo "${after[*]}")" --peak-rss-kb "$rss" --elected-ms "$elected_ms"
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
# Heavy skew (Zipf 1.3): automatic spreading off vs on, throughput and the
# per-node CPU spread (scripts/bench-skew.sh, which prints its own summary).
# Not in --smoke: it waits for spreads to become active (a minute or more).
if [[ -z "$SMOKE" ]] && wanted skew; then
  log "skew: Zipf 1.3 over 1M ids, automatic spreading off, then on"
  BENCH_PROFILE="$PROFILE" TALLY_NO_BUILD=1 "$TALLY_ROOT/scripts/bench-skew.sh" "$DURATION" >"$WORK/skew.txt" \
    2>"$WORK/skew.err" || { tail -5 "$WORK/skew.err" >&2; FAILED+=(skew); }
  cat "$WORK/skew.txt" >&2
fi

# --- report ------------------------------------------------------------------
if [[ -n "$SMOKE" || -n "$ONLY" ]]; then
  OUT="$(mktemp "${TMPDIR:-/tmp}/tally-bench-partial.XXXXXX.md")"
else
  OUT="$TALLY_ROOT/docs/BENCHMARKS.md"
fi
"$TALLY" bench report --work "$WORK" --out "$OUT" ${SMOKE:+--smoke} --duration "$DURATION" --profile "$PROFILE" \
  --version-tally "$("$TALLYD" --version 2>&1 | head -1)" --version-redis "$(redis-server --version 2>&1 | head -1)" \
  --version-etcd "$(etcd --version 2>&1 | head -1)" --ids "$IDS" --zipf "$ZIPF" --types "$TYPES" \
  --duplicates "$DUPLICATES" --time-spread "$SPREAD" --concurrency "$CONCURRENCY" --inflight "$INFLIGHT" \
  --seed "$SEED" --partitions "$TALLY_PARTITIONS" --etcd-flags "${ETCD_FLAGS[*]}"
log "results written to $OUT"
if ((${#FAILED[@]})); then
  log "failed to run: ${FAILED[*]}"
  exit 1
fi
