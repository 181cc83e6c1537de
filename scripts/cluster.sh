#!/usr/bin/env bash
# Run a local Tally cluster.
#
#   scripts/cluster.sh up [N] [--secure]
#                                    build if needed, start N nodes (default 3),
#                                    initialise, wait for leaders, show it counting;
#                                    --secure: TLS on both ports (a local CA and node
#                                    certificate, mutual TLS between nodes) and bearer
#                                    tokens (admin, writer, reader, node), all made
#                                    under $TALLY_HOME/secure
#   scripts/cluster.sh down          stop every node (SIGTERM, then SIGKILL)
#   scripts/cluster.sh status        cluster status as seen by node 1
#   scripts/cluster.sh kill NODE     SIGKILL one node
#   scripts/cluster.sh restart NODE  stop one node gracefully and start it again
#
# Environment: TALLY_HOME (data and logs, default ./.tally), TALLY_HOST
# (127.0.0.1), TALLY_BASE_PORT (7001: node i serves clients on base+i-1),
# TALLY_PEER_BASE_PORT (default base+100: node i's peer port, for Raft
# traffic between nodes, is peer_base+i-1, so 7101..), TALLY_HTTP_BASE_PORT
# (default base+1000: node i serves /metrics, /healthz and /readyz on
# http_base+i-1, so 8001..; "off" = no HTTP listener), TALLY_PARTITIONS
# (64), TALLY_PROFILE (dev or release; default dev),
# TALLY_NO_BUILD=1 (up: use the binaries already built, e.g. by bench.sh),
# TALLY_NO_DEMO=1 (up: skip the demo), TALLY_EXTRA_ARGS (more tallyd flags,
# split on spaces, e.g. "--quiesce-after-ms 0").
set -euo pipefail
source "$(dirname "$0")/env.sh"

TALLY_HOME="${TALLY_HOME:-./.tally}"
mkdir -p "$TALLY_HOME"
TALLY_HOME="$(cd "$TALLY_HOME" && pwd)"
HOST="${TALLY_HOST:-127.0.0.1}"
BASE_PORT="${TALLY_BASE_PORT:-7001}"
PEER_BASE_PORT="${TALLY_PEER_BASE_PORT:-$((BASE_PORT + 100))}"
HTTP_BASE_PORT="${TALLY_HTTP_BASE_PORT:-$((BASE_PORT + 1000))}"
PARTITIONS="${TALLY_PARTITIONS:-64}"
PROFILE="${TALLY_PROFILE:-dev}"
if [[ "$PROFILE" == dev ]]; then BIN_DIR="$CARGO_TARGET_DIR/debug"; else BIN_DIR="$CARGO_TARGET_DIR/$PROFILE"; fi
TALLYD="$BIN_DIR/tallyd"
TALLY="$BIN_DIR/tally"

addr_of() { echo "$HOST:$((BASE_PORT + $1 - 1))"; }
peer_addr_of() { echo "$HOST:$((PEER_BASE_PORT + $1 - 1))"; }
http_args_of() { [[ "$HTTP_BASE_PORT" == off ]] || echo "--http-listen $HOST:$((HTTP_BASE_PORT + $1 - 1))"; }
pid_of() { cat "$TALLY_HOME/node$1.pid" 2>/dev/null || true; }
SECURE="$TALLY_HOME/secure"
secure() { [[ -f "$SECURE/tokens" ]]; }
# A random token: 24 bytes from the kernel, hex.
new_token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
make_secrets() {
  secure && return
  mkdir -p "$SECURE"; chmod 700 "$SECURE"
  : > "$SECURE/tokens.new"
  for role in admin writer reader node; do
    new_token > "$SECURE/$role.token"; chmod 600 "$SECURE/$role.token"
    echo "local-$role $role $(tr -d '\n' < "$SECURE/$role.token" | sha256sum | cut -d' ' -f1)" >> "$SECURE/tokens.new"
  done
  "$TALLY_ROOT/scripts/make-certs.sh" "$SECURE/tls"
  mv "$SECURE/tokens.new" "$SECURE/tokens"
}
secure_args_of() {
  secure || return 0
  echo "--auth-file $SECURE/tokens --node-token-file $SECURE/node.token" \
    "--tls-cert $SECURE/tls/node.pem --tls-key $SECURE/tls/node.key --peer-ca $SECURE/tls/ca.pem"
}
# The script's own calls (status, init, wait) need admin rights on a secure
# cluster, and every call the cluster's CA.
as_role() {
  local role=$1; shift
  if secure; then TALLY_TOKEN="$(cat "$SECURE/$role.token")" TALLY_CA="$SECURE/tls/ca.pem" "$@"; else "$@"; fi
}
as_admin() { as_role admin "$@"; }
alive() { local p; p=$(pid_of "$1"); [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }
count_nodes() { ls "$TALLY_HOME"/node*.addr 2>/dev/null | wc -l; }

build() {
  if [[ -n "${TALLY_NO_BUILD:-}" ]]; then
    [[ -x "$TALLYD" && -x "$TALLY" ]] || { echo "TALLY_NO_BUILD is set but $BIN_DIR has no tallyd/tally" >&2; exit 1; }
    return
  fi
  "$TALLY_ROOT/scripts/setup.sh"
  (cd "$TALLY_ROOT" && cargo build --profile "$PROFILE" --workspace --all-targets)
}

start_node() {
  local i=$1 addr
  addr=$(addr_of "$i")
  if alive "$i"; then echo "node $i already running (pid $(pid_of "$i"))"; return; fi
  echo "$addr" > "$TALLY_HOME/node$i.addr"
  local extra=()
  read -r -a extra <<<"${TALLY_EXTRA_ARGS:-}"
  RUST_LOG="${RUST_LOG:-info,openraft=error}" nohup "$TALLYD" --node-id "$i" --listen "$addr" \
    --peer-listen "$(peer_addr_of "$i")" $(http_args_of "$i") $(secure_args_of) --data-dir "$TALLY_HOME/node$i" ${extra[@]+"${extra[@]}"} >>"$TALLY_HOME/node$i.log" 2>&1 &
  echo $! > "$TALLY_HOME/node$i.pid"
  for _ in $(seq 1 100); do
    if as_admin "$TALLY" --addr "$addr" cluster status >/dev/null 2>&1; then return; fi
    if ! alive "$i"; then echo "node $i exited; see $TALLY_HOME/node$i.log" >&2; tail -5 "$TALLY_HOME/node$i.log" >&2; exit 1; fi
    sleep 0.1
  done
  echo "node $i did not start listening on $addr" >&2; exit 1
}

stop_node() {
  local i=$1 sig=${2:-TERM} p
  p=$(pid_of "$i")
  [[ -z "$p" ]] && return
  kill "-$sig" "$p" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  rm -f "$TALLY_HOME/node$i.pid"
}

cmd_up() {
  local n=3 nodes=() arg
  for arg in "$@"; do
    case "$arg" in
      --secure) make_secrets ;;
      *) n=$arg ;;
    esac
  done
  build
  for i in $(seq 1 "$n"); do start_node "$i"; nodes+=(--node "$i=$(addr_of "$i")"); done
  local ok=""
  for _ in $(seq 1 50); do
    if as_admin "$TALLY" --addr "$(addr_of 1)" cluster init "${nodes[@]}" --partitions "$PARTITIONS" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.3
  done
  [[ -n "$ok" ]] || { echo "cluster init failed; see $TALLY_HOME/node1.log" >&2; exit 1; }
  as_admin "$TALLY" --addr "$(addr_of 1)" cluster wait --timeout 60s
  echo
  echo "Tally is running: $n nodes, $PARTITIONS partitions, data and logs in $TALLY_HOME"
  for i in $(seq 1 "$n"); do
    metrics=""
    [[ "$HTTP_BASE_PORT" == off ]] || metrics="  metrics http://$HOST:$((HTTP_BASE_PORT + i - 1))/metrics"
    echo "  node $i  $(addr_of "$i")  peers $(peer_addr_of "$i")$metrics  (pid $(pid_of "$i"))"
  done
  if [[ "${TALLY_NO_DEMO:-}" == "" ]]; then demo "$n"; fi
  echo
  if secure; then
    echo "TLS and tokens are on: the CA is $SECURE/tls/ca.pem, tokens (roles admin, writer, reader) $SECURE/*.token"
    echo "      export TALLY_CA=$SECURE/tls/ca.pem"
    echo "      export TALLY_TOKEN=\$(cat $SECURE/writer.token)   # to ingest; reader.token to query, admin.token for cluster commands"
  fi
  echo "Try:  export TALLY_ADDR=$(addr_of 1)"
  echo "      $TALLY ingest video-42 view --repeat 10"
  echo "      $TALLY stats video-42 view --from -1h --to now"
  echo "      $TALLY cluster status"
  echo "Stop: scripts/cluster.sh down"
}

demo() {
  local n=${1:-3} a other
  a=$(addr_of 1); other=$(addr_of $(( n > 1 ? 2 : 1 )))
  echo
  echo "Counting: 900 views of demo-video, then one more view sent 100 times with the same event id"
  echo "(counted once), and 25 likes sent to another node"
  as_role writer "$TALLY" --addr "$a" ingest demo-video view --repeat 900
  as_role writer "$TALLY" --addr "$a" ingest demo-video view --id "demo-once-$(date +%s%N)" --repeat 100
  as_role writer "$TALLY" --addr "$other" ingest demo-video like --repeat 25
  echo "stats demo-video view (last hour):"
  as_role reader "$TALLY" --addr "$a" stats demo-video view --from -1h --to +1m
  echo "stats demo-video like (last hour), read from node $n:"
  as_role reader "$TALLY" --addr "$(addr_of "$n")" stats demo-video like --from -1h --to +1m
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down)
    for f in "$TALLY_HOME"/node*.pid; do [[ -e "$f" ]] || continue; i=${f##*node}; i=${i%.pid}; stop_node "$i" TERM; done
    echo "stopped" ;;
  status) as_admin "$TALLY" --addr "${TALLY_ADDR:-$(addr_of 1)}" cluster status ;;
  kill) stop_node "${2:?node}" KILL; echo "node $2 killed" ;;
  restart) stop_node "${2:?node}" TERM; start_node "$2"; echo "node $2 restarted" ;;
  demo) demo "${2:-3}" ;;
  *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 1 ;;
esac
