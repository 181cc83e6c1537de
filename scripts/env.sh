# Shared settings for Tally's scripts; sourced, not run.
# One fixed target dir outside the clone, so CI and local builds share a warm cache.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/tally-target}"
TALLY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TALLY_ROOT
