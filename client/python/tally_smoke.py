#!/usr/bin/env python3
"""Drives a real Tally cluster through the generated Python client.

Run through `scripts/gen-clients.sh python-test HOST:PORT[,...]`, which
generates the stubs into client/python/gen/ and runs this file with the
virtual environment's Python. Checks: the gRPC health service of every
node, cluster status, ingestion with event ids, duplicates on re-send, a
rejected invalid event naming its field, exact stats and series, a stale
read, and that Python computes the same partition as the server's
partitioner (xxh3_64(entity_id) mod partition_count). With TALLY_CA (and
TALLY_TOKEN, TALLY_CERT, TALLY_KEY) it connects over TLS with a token.

Prints "N passed, N failed" and exits non-zero on any failure.
"""

import sys
import time
import uuid

import tally_checks
from tally_checks import Checks, addrs_from_args  # also puts gen/ on the path

import grpc  # noqa: E402
import xxhash  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tally.v1 import tally_pb2, tally_pb2_grpc  # noqa: E402

checks = Checks()
check = checks.check


def partition_of(entity_id: bytes, partition_count: int) -> int:
    """The server's partitioner, frozen: xxh3_64 with seed 0, mod count."""
    return xxhash.xxh3_64_intdigest(entity_id) % max(partition_count, 1)


def main() -> int:
    addrs = addrs_from_args()
    channels = {a: tally_checks.channel(a) for a in addrs}
    first = channels[addrs[0]]

    # Health of every node and service.
    for addr, channel in channels.items():
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("tally.v1.Ingest", "tally.v1.Query", "tally.v1.Cluster"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            check(f"health {addr} {service}", reply.status == health_pb2.HealthCheckResponse.SERVING, str(reply))

    status = tally_pb2_grpc.ClusterStub(first).Status(tally_pb2.StatusRequest(), timeout=5)
    check("status initialised", status.initialized)
    check("status lists the nodes", len(status.nodes) == len(addrs), str(status.nodes))
    check("every partition has a leader", all(p.leader_node_id != 0 for p in status.partitions))

    # The partitioner pinned in tally-proto's tests.
    check("partitioner video-1/64", partition_of(b"video-1", 64) == 55)
    check("partitioner user:42/1000", partition_of(b"user:42", 1000) == 826)

    # Ingest with ids through the leader of the entity's partition.
    entity = f"py-{uuid.uuid4().hex[:12]}".encode()
    partition = partition_of(entity, status.partition_count)
    leader = next(p.leader_node_id for p in status.partitions if p.partition == partition)
    leader_addr = next(n.addr for n in status.nodes if n.node_id == leader)
    ingest = tally_pb2_grpc.IngestStub(channels.get(leader_addr, first))
    now = int(time.time() * 1000)
    events = [
        tally_pb2.Event(entity_id=entity, event_type="view", event_time_ms=now, event_id=f"e{i}".encode(), value=2)
        for i in range(100)
    ]
    reply = ingest.Ingest(tally_pb2.IngestRequest(events=events), timeout=10)
    check("ingest accepted", reply.accepted == 100 and reply.duplicates == 0, str(reply))
    check("ingest names the leader", any(h.partition == partition and h.leader_node_id == leader for h in reply.leaders), str(reply.leaders))

    # The same ids again, through another node: all duplicates.
    other = tally_pb2_grpc.IngestStub(channels[addrs[-1]])
    reply = other.Ingest(tally_pb2.IngestRequest(events=events), timeout=10)
    check("re-send is duplicate", reply.accepted == 0 and reply.duplicates == 100, str(reply))

    # An invalid event is rejected by name; its valid neighbour is counted.
    bad = tally_pb2.Event(entity_id=entity, event_type="Not Valid", event_time_ms=now, event_id=b"bad")
    good = tally_pb2.Event(entity_id=entity, event_type="like", event_time_ms=now, event_id=b"good")
    reply = ingest.Ingest(tally_pb2.IngestRequest(events=[bad, good]), timeout=10)
    check(
        "invalid event rejected by field",
        reply.accepted == 1 and len(reply.rejected) == 1 and reply.rejected[0].field == "event_type"
        and reply.rejected[0].index == 0 and not reply.rejected[0].retryable,
        str(reply),
    )

    query = tally_pb2_grpc.QueryStub(first)
    stats = query.Stats(
        tally_pb2.StatsRequest(entity_id=entity, event_type="view", from_ms=now - 3_600_000, to_ms=now + 60_000,
                               consistency=tally_pb2.CONSISTENCY_LINEARIZABLE),
        timeout=10,
    )
    check("stats exact", stats.count == 100 and stats.sum == 200 and abs(stats.average - 2.0) < 1e-9, str(stats))
    series = query.Series(
        tally_pb2.SeriesRequest(entity_id=entity, event_type="view", from_ms=now - 600_000, to_ms=now + 60_000,
                                granularity=tally_pb2.GRANULARITY_MINUTE,
                                consistency=tally_pb2.CONSISTENCY_LINEARIZABLE),
        timeout=10,
    )
    check("series sums to the count", sum(b.count for b in series.buckets) == 100, str(series))
    # A stale read may lag, so wait for it to catch up instead of expecting it at once.
    stale_count = -1
    for _ in range(50):
        stale = tally_pb2_grpc.QueryStub(channels[addrs[-1]]).Stats(
            tally_pb2.StatsRequest(entity_id=entity, event_type="like", from_ms=now - 3_600_000, to_ms=now + 60_000,
                                   consistency=tally_pb2.CONSISTENCY_STALE),
            timeout=10,
        )
        stale_count = stale.count
        if stale_count == 1:
            break
        time.sleep(0.1)
    check("stale read catches up", stale_count == 1, str(stale_count))

    try:
        query.Stats(tally_pb2.StatsRequest(entity_id=b"", event_type="view", from_ms=0, to_ms=60_000), timeout=5)
        check("empty entity is INVALID_ARGUMENT", False, "no error")
    except grpc.RpcError as e:
        check("empty entity is INVALID_ARGUMENT", e.code() == grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return checks.summary()


if __name__ == "__main__":
    sys.exit(main())
