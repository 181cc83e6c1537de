"""What the Python check scripts (tally_smoke.py, tally_contract.py) share.

Importing it puts the generated stubs (client/python/gen/, written by
scripts/gen-clients.sh) on the import path. `Checks` prints one line per
check and the "N passed, N failed" summary the cluster tests look for.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))


def addrs_from_args():
    """The --addr host:port[,host:port...] argument, split."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True, help="host:port[,host:port...]")
    args = parser.parse_args()
    return [a.strip() for a in args.addr.split(",") if a.strip()]


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, condition, detail=""):
        if condition:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name} {detail}")

    def summary(self):
        """Print the summary; the process exit status."""
        print(f"{self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1
