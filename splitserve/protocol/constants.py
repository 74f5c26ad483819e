"""Numbers every process must agree on: protocol version, gRPC channel settings, ports.

One place for them, so a server and its clients can never be configured apart.
"""

from __future__ import annotations

from splitserve.proto import splitserve_pb2 as pb

# Bumped on any incompatible change to splitserve.v1; checked at every hand-off and handshake.
PROTOCOL_VERSION: int = pb.PROTOCOL_VERSION

# KV chunks are at most 64 MiB (``SourceConfig.max_chunk_bytes``), plus the message framing.
MAX_MESSAGE_BYTES = 80 << 20

# Servers (engine pods): accept the keepalive pings clients send on idle channels instead of
# answering them with GOAWAY (too_many_pings), which would drop the connection.
GRPC_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]

# Clients (router -> engines, decode -> prefill): ping idle channels so a dead peer is noticed
# within seconds, and reconnect quickly: a pod restarted on the same address is back within
# ~2 s, where gRPC's default backoff (up to 2 minutes) would keep refusing it.
GRPC_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# Default ports of the deployables (the operator and the charts render the same numbers).
ROUTER_HTTP_PORT = 8000
ENGINE_GRPC_PORT = 50051
ENGINE_METRICS_PORT = 9090

# Names of the gRPC services an engine pod may serve (health reports each one).
PREFILL_SERVICE = "splitserve.v1.PrefillService"
DECODE_SERVICE = "splitserve.v1.DecodeService"
KV_SERVICE = "splitserve.v1.KVService"
ENGINE_SERVICE = "splitserve.v1.EngineService"

# What a decode pod does when a KV pull fails: compute the prompt itself, or fail the request.
KV_FAILURE_POLICIES = ("recompute", "fail")

# The router reads its accepted API keys (comma- or newline-separated) from this variable:
# launchers and pods pass keys there or in a file, never on a command line.
API_KEYS_ENV = "SPLITSERVE_API_KEYS"
