#!/usr/bin/env bash
# A long Jepsen-style run: kills, pauses and network partitions against a
# real 3-node cluster under load, then the exactness checker.
#
#   scripts/nemesis.sh [--duration 30m] [--seed S]
#
# The same test runs for ~1 minute in scripts/test.sh; this lengthens it.
# The report (faults, events attempted/acknowledged, violations, time from a
# leader's kill to the first write on its partitions) is printed at the end.
set -euo pipefail
source "$(dirname "$0")/env.sh"

duration=30m seed=""
while (($#)); do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 1 ;;
  esac
done
to_secs() {
  local v=$1
  case "$v" in
    *h) echo $(( ${v%h} * 3600 )) ;;
    *m) echo $(( ${v%m} * 60 )) ;;
    *s) echo "${v%s}" ;;
    *) echo "$v" ;;
  esac
}
export TALLY_NEMESIS_SECS; TALLY_NEMESIS_SECS=$(to_secs "$duration")
if [[ -n "$seed" ]]; then export TALLY_NEMESIS_SEED="$seed"; fi

"$TALLY_ROOT/scripts/setup.sh"
cd "$TALLY_ROOT"
cargo build --workspace --all-targets
# The long single-fault tests first (a follower cut off behind ~85 MiB of
# big entries; a minute of leaders restarted at once), then the nemesis.
cargo test -p cluster-tests --test cluster -- entry_limits:: --ignored
TALLY_RESTART_SECS=60 cargo test -p cluster-tests --test cluster -- restart_at_once:: --nocapture 2>&1 | grep -E 'restarts at once|test result'
cargo test -p cluster-tests --test cluster -- nemesis:: --nocapture 2>&1 | tee "${TALLY_NEMESIS_LOG:-/tmp/tally-nemesis.log}" \
  | grep -E '^(nemesis|---|faults|events|kill|violations|  |test result)'
