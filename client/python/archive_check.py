"""Reads a Tally cold archive's Parquet files with pyarrow, as any user of
the archive would, and compares what they hold with what the test's model
says they must hold.

Usage: archive_check.py --dir ARCHIVE_DIR --expect EXPECT.json

EXPECT.json: {"files": N, "minutes": {"ENTITY|TYPE|START_MS": [COUNT, SUM]},
"hours": {...}} — every minute and hour bucket of the model that ends by its
partition's archived horizon. Prints one line per check and
"N passed, N failed".
"""

import argparse
import collections
import json
import pathlib

import pyarrow.parquet as pq

COLUMNS = ["entity_id", "event_type", "granularity", "bucket_start", "count", "sum", "actors_sketch"]

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--expect", required=True)
    args = ap.parse_args()
    expected = json.loads(pathlib.Path(args.expect).read_text())
    files = sorted(pathlib.Path(args.dir).rglob("*.parquet"))
    check("one file per archived segment with buckets", len(files) == expected["files"],
          f"{len(files)} files, expected {expected['files']}")
    got = {"minute": {}, "hour": {}}
    seen = collections.Counter()
    for f in files:
        table = pq.read_table(f)
        check(f"{f.name}: schema", table.column_names == COLUMNS, table.column_names)
        check(f"{f.name}: bucket_start is a UTC timestamp",
              str(table.schema.field("bucket_start").type) == "timestamp[ms, tz=UTC]",
              str(table.schema.field("bucket_start").type))
        starts = table.column("bucket_start").cast("int64").to_pylist()
        for row, start in zip(table.select(["entity_id", "event_type", "granularity", "count", "sum"]).to_pylist(),
                              starts):
            key = f"{row['entity_id'].decode()}|{row['event_type']}|{start}"
            seen[(row["granularity"], key)] += 1
            if row["granularity"] in got:
                got[row["granularity"]][key] = [row["count"], int(row["sum"])]
    twice = [k for k, n in seen.items() if n > 1]
    check("every bucket in exactly one file", not twice, twice[:5])
    for granularity, name in (("minute", "minutes"), ("hour", "hours")):
        want = expected[name]
        have = got[granularity]
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        wrong = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
        check(f"{granularity} buckets equal the model ({len(want)})", not (missing or extra or wrong),
              f"missing {missing[:3]}, extra {extra[:3]}, wrong {wrong[:3]}")
    print(f"{passed} passed, {failed} failed")


if __name__ == "__main__":
    main()
