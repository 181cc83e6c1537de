#!/usr/bin/env bash
# The test command: installs build prerequisites, builds the binaries the
# cluster tests start, runs every test of the workspace, then a short smoke
# of the side-by-side benchmark (seconds per system, no assertions on speed)
# so that scripts/bench.sh keeps working.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$TALLY_ROOT/scripts/setup.sh"
cd "$TALLY_ROOT"
# Formatting (rustfmt.toml) is checked first: it fails in a second. rustup's
# default profile has rustfmt; a toolchain without it skips the check.
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "test.sh: rustfmt is not installed; skipping the format check" >&2
fi
cargo build --workspace --all-targets
cargo test --workspace "$@"
"$TALLY_ROOT/scripts/bench.sh" --smoke
