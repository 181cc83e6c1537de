#!/usr/bin/env bash
# The test command: installs build prerequisites, builds the binaries the
# cluster tests start, runs every test of the workspace, then a short smoke
# of the side-by-side benchmark (seconds per system, no assertions on speed)
# so that scripts/bench.sh keeps working.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$TALLY_ROOT/scripts/setup.sh"
cd "$TALLY_ROOT"
cargo build --workspace --all-targets
cargo test --workspace "$@"
"$TALLY_ROOT/scripts/bench.sh" --smoke
