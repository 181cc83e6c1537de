#!/usr/bin/env bash
# Generates Tally clients for other languages from proto/tally/v1/tally.proto.
#
#   scripts/gen-clients.sh python            venv + grpcio-tools, generate into client/python/gen/
#   scripts/gen-clients.sh python-test ADDRS generate, then run client/python/tally_smoke.py
#                                            against a running cluster (ADDRS: host:port,...)
#   scripts/gen-clients.sh python-contract ADDRS
#                                            generate, then run client/python/tally_contract.py
#                                            (error codes and limits as a grpcio client sees them)
#   scripts/gen-clients.sh python-archive DIR EXPECT.json
#                                            read a cold archive's Parquet files with pyarrow
#                                            (client/python/archive_check.py, for the cluster tests)
#   scripts/gen-clients.sh go                generate Go stubs into gen/go/ (needs protoc,
#                                            protoc-gen-go and protoc-gen-go-grpc; see below)
#
# Python: a virtual environment is created at $TALLY_VENV (default
# $TALLY_HOME/venv when TALLY_HOME is set, else ~/.cache/tally-venv) and the
# pinned packages below are installed into it with pip; nothing is installed
# system-wide. Re-running is cheap: the install is skipped when the pinned
# versions are already there. Any failure (no python3, no venv module, no
# network to PyPI) stops the script with a non-zero status.
#
# Go (no Go toolchain is needed for anything else in Tally, so none is
# installed here):
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@latest
#   go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@latest
#   protoc -I proto --go_out=gen/go --go_opt=module=github.com/tally-dev/tally/gen/go \
#          --go-grpc_out=gen/go --go-grpc_opt=module=github.com/tally-dev/tally/gen/go \
#          proto/tally/v1/tally.proto
# The package path comes from the proto's go_package option
# (github.com/tally-dev/tally/gen/go/tally/v1, package tallyv1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GRPCIO_VERSION=1.76.0
PYARROW_VERSION=26.0.1
XXHASH_VERSION=3.5.0
if [[ -n "${TALLY_VENV:-}" ]]; then VENV="$TALLY_VENV"
elif [[ -n "${TALLY_HOME:-}" ]]; then VENV="$TALLY_HOME/venv"
else VENV="$HOME/.cache/tally-venv"; fi
GEN="$ROOT/client/python/gen"

die() { echo "gen-clients: $*" >&2; exit 1; }

# Runs that overlap would race: on the virtual environment (checkouts share
# it) and on this checkout's generated stubs, which `gen_python` deletes and
# writes again while another run may be importing them (the cluster tests
# are one binary, and its two Python tests can run at once). Each is taken
# under an exclusive lock, held until the script, or the Python it becomes
# with `exec`, exits. flock(1) is util-linux, on every Debian.
hold_lock() {
  local file="$1" fd
  mkdir -p "$(dirname "$file")"
  exec {fd}>"$file"
  flock "$fd" || die "could not lock $file"
}

python_venv() {
  command -v python3 >/dev/null 2>&1 || die "python3 is required for the Python client"
  hold_lock "$VENV.lock"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "gen-clients: creating virtual environment $VENV" >&2
    python3 -m venv "$VENV" || die "could not create a virtual environment at $VENV (Debian: apt-get install python3-venv)"
  fi
  local want="grpcio==$GRPCIO_VERSION grpcio-tools==$GRPCIO_VERSION grpcio-health-checking==$GRPCIO_VERSION xxhash==$XXHASH_VERSION pyarrow==$PYARROW_VERSION"
  if [[ "$(cat "$VENV/.tally-packages" 2>/dev/null)" != "$want" ]]; then
    echo "gen-clients: installing $want" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $want \
      || die "pip install failed (is PyPI reachable?)"
    echo "$want" > "$VENV/.tally-packages"
  fi
}

gen_python() {
  hold_lock "$GEN.lock"
  python_venv
  rm -rf "$GEN"
  mkdir -p "$GEN"
  "$VENV/bin/python" -m grpc_tools.protoc -I "$ROOT/proto" \
    --python_out="$GEN" --pyi_out="$GEN" --grpc_python_out="$GEN" \
    "$ROOT/proto/tally/v1/tally.proto" || die "protoc failed"
  echo "gen-clients: Python client in $GEN (import tally.v1.tally_pb2, tally.v1.tally_pb2_grpc)" >&2
}

case "${1:-python}" in
  python) gen_python ;;
  python-test)
    addrs="${2:?usage: gen-clients.sh python-test HOST:PORT[,HOST:PORT...]}"
    gen_python
    exec "$VENV/bin/python" "$ROOT/client/python/tally_smoke.py" --addr "$addrs"
    ;;
  python-archive)
    dir="${2:?usage: gen-clients.sh python-archive ARCHIVE_DIR EXPECT.json}"
    expect="${3:?usage: gen-clients.sh python-archive ARCHIVE_DIR EXPECT.json}"
    python_venv
    exec "$VENV/bin/python" "$ROOT/client/python/archive_check.py" --dir "$dir" --expect "$expect"
    ;;
  python-contract)
    addrs="${2:?usage: gen-clients.sh python-contract HOST:PORT[,HOST:PORT...]}"
    gen_python
    exec "$VENV/bin/python" "$ROOT/client/python/tally_contract.py" --addr "$addrs"
    ;;
  go)
    command -v protoc >/dev/null 2>&1 && command -v protoc-gen-go >/dev/null 2>&1 \
      && command -v protoc-gen-go-grpc >/dev/null 2>&1 \
      || die "Go generation needs protoc, protoc-gen-go and protoc-gen-go-grpc on PATH; see the commands at the top of this script"
    mkdir -p "$ROOT/gen/go"
    protoc -I "$ROOT/proto" \
      --go_out="$ROOT/gen/go" --go_opt=module=github.com/tally-dev/tally/gen/go \
      --go-grpc_out="$ROOT/gen/go" --go-grpc_opt=module=github.com/tally-dev/tally/gen/go \
      "$ROOT/proto/tally/v1/tally.proto"
    ;;
  *) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 1 ;;
esac
