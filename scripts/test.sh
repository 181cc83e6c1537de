#!/usr/bin/env bash
# The test command: installs build prerequisites, builds the binaries the
# cluster tests start, then runs every test of the workspace.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$TALLY_ROOT/scripts/setup.sh"
cd "$TALLY_ROOT"
cargo build --workspace --all-targets
cargo test --workspace "$@"
