#!/usr/bin/env python3
"""Checks the edges of Tally's API contract from a client that is not Rust.

Run through `scripts/gen-clients.sh python-contract HOST:PORT[,...]` against
an initialised cluster. What a plain grpcio client must see:

* bytes that are not a protobuf message of the method's request type are
  INVALID_ARGUMENT (not INTERNAL), and the message names the method, the
  request type and the field that failed to decode;
* a request over a method's size limit is RESOURCE_EXHAUSTED (not
  OUT_OF_RANGE), naming the method and the limit: Ingest above its 4 MiB
  batch limit, Query and Cluster above 1 MiB;
* Initialize on an initialised cluster: the same shape answers
  already_initialized (a replication factor above the node count is capped,
  so it is the same shape); a different replication factor or partition
  count is FAILED_PRECONDITION naming what differs;
* the internal Raft service is not on the public port (UNIMPLEMENTED);
* Status lists each node's peer address, and Ingest replies carry the dedup
  window.

Prints "N passed, N failed" and exits non-zero on any failure.
"""

import sys
import time
import uuid

from tally_checks import Checks, addrs_from_args  # also puts gen/ on the path

import grpc  # noqa: E402
from tally.v1 import tally_pb2, tally_pb2_grpc  # noqa: E402

checks = Checks()
check = checks.check


def raw(channel, method):
    """A unary call that sends and returns raw bytes (identity serializers)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def expect_error(name, call, code, *says):
    try:
        reply = call()
        check(name, False, f"no error: {reply!r}"[:300])
    except grpc.RpcError as e:
        details = e.details() or ""
        missing = [s for s in says if s not in details]
        check(name, e.code() == code and not missing, f"got {e.code()} {details!r}; wanted {code} naming {missing}")


def main() -> int:
    addrs = addrs_from_args()
    # Large enough to send over-limit bodies and read any answer.
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(addrs[0], options=options)

    # Not protobuf: field 1 of IngestRequest (events) is a message; a varint
    # there cannot decode. Then bytes that are not protobuf at all.
    ingest_path = "/tally.v1.Ingest/Ingest"
    expect_error(
        "wrong wire type is INVALID_ARGUMENT naming method, type and field",
        lambda: raw(channel, ingest_path)(b"\x08\x05", timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        ingest_path, "tally.v1.IngestRequest", "events",
    )
    expect_error(
        "garbage bytes are INVALID_ARGUMENT naming the method",
        lambda: raw(channel, ingest_path)(b"\xff\xff\xff\xff\xff\xff", timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        ingest_path, "is not a valid tally.v1.IngestRequest",
    )
    expect_error(
        "Query garbage is INVALID_ARGUMENT too",
        lambda: raw(channel, "/tally.v1.Query/Stats")(b"\x0a\xff\xff", timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "/tally.v1.Query/Stats", "tally.v1.StatsRequest",
    )

    # Over the decode limits. The bodies are never decoded, so their bytes
    # need not be protobuf.
    expect_error(
        "Ingest over its limit is RESOURCE_EXHAUSTED naming the limit",
        lambda: raw(channel, ingest_path)(b"\x00" * (6 << 20), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ingest_path, "limit", "bytes",
    )
    expect_error(
        "Query over 1 MiB is RESOURCE_EXHAUSTED",
        lambda: raw(channel, "/tally.v1.Query/Stats")(b"\x00" * (2 << 20), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "/tally.v1.Query/Stats", "limit",
    )
    expect_error(
        "Cluster over 1 MiB is RESOURCE_EXHAUSTED",
        lambda: raw(channel, "/tally.v1.Cluster/Initialize")(b"\x00" * (2 << 20), timeout=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "/tally.v1.Cluster/Initialize", "limit",
    )

    # The peer protocol is not on the public port.
    expect_error(
        "Raft.Ping on the public port is UNIMPLEMENTED",
        lambda: raw(channel, "/tally.internal.v1.Raft/Ping")(b"", timeout=10),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    expect_error(
        "Raft.Propose on the public port is UNIMPLEMENTED",
        lambda: raw(channel, "/tally.internal.v1.Raft/Propose")(b"\x08\x00", timeout=10),
        grpc.StatusCode.UNIMPLEMENTED,
    )

    cluster = tally_pb2_grpc.ClusterStub(channel)
    status = cluster.Status(tally_pb2.StatusRequest(), timeout=10)
    check("status lists every node's peer address",
          all(n.peer_addr and n.peer_addr != n.addr for n in status.nodes) and len(status.nodes) == len(addrs),
          str(status.nodes))

    # Initialize against the running cluster.
    nodes = [tally_pb2.NodeInfo(node_id=n.node_id, addr=n.addr) for n in status.nodes]
    same = cluster.Initialize(
        tally_pb2.InitializeRequest(nodes=nodes, partitions=status.partition_count,
                                    replication_factor=status.replication_factor), timeout=30)
    check("same shape is already_initialized", same.already_initialized, str(same))
    capped = cluster.Initialize(
        tally_pb2.InitializeRequest(nodes=nodes, partitions=status.partition_count,
                                    replication_factor=len(nodes) + 2), timeout=30)
    check("rf above the node count is capped: same shape", capped.already_initialized, str(capped))
    other_rf = max(1, status.replication_factor - 1)
    expect_error(
        "different replication factor is FAILED_PRECONDITION naming it",
        lambda: cluster.Initialize(tally_pb2.InitializeRequest(
            nodes=nodes, partitions=status.partition_count, replication_factor=other_rf), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
        "replication_factor", f"has {status.replication_factor}", f"asks for {other_rf}",
    )
    expect_error(
        "different partition count is FAILED_PRECONDITION naming it",
        lambda: cluster.Initialize(tally_pb2.InitializeRequest(
            nodes=nodes, partitions=status.partition_count * 2,
            replication_factor=status.replication_factor), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
        "partitions",
    )
    expect_error(
        "different nodes are FAILED_PRECONDITION naming them",
        lambda: cluster.Initialize(tally_pb2.InitializeRequest(
            nodes=nodes[:1], partitions=status.partition_count,
            replication_factor=status.replication_factor), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
        "nodes",
    )

    # Ingest replies carry the dedup window.
    now = int(time.time() * 1000)
    event = tally_pb2.Event(entity_id=f"py-{uuid.uuid4().hex[:12]}".encode(), event_type="view",
                            event_time_ms=now, event_id=b"contract-1")
    reply = tally_pb2_grpc.IngestStub(channel).Ingest(tally_pb2.IngestRequest(events=[event]), timeout=10)
    check("ingest reply carries the dedup window", reply.accepted == 1 and reply.dedup_window_ms == 600_000, str(reply))

    return checks.summary()


if __name__ == "__main__":
    sys.exit(main())
