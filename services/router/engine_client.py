"""gRPC client of one engine pod: prefill, decode streams, abort, stats and KV events.

One ``grpc.aio`` channel per pod carries every service (the pods serve them all on one port).
Calls about a request carry its request id and trace context as metadata (``outgoing_metadata``).
Failures are translated into ``BackendError`` with ``retryable`` set when another pod could
succeed (the pod is down, overloaded or restarting), and unset when the request itself was bad.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc

from splitserve.observability.tracing import outgoing_metadata
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import GRPC_CHANNEL_OPTIONS
from splitserve.services.router.errors import BackendError

# Status codes that say "this pod could not do it", not "the request is wrong".
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.FAILED_PRECONDITION,  # e.g. an expired lease / incompatible pods
    grpc.StatusCode.NOT_FOUND,  # a LoRA adapter unloaded since the router last heard
}


def to_backend_error(err: grpc.RpcError, address: str) -> BackendError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The pod rejected the request itself: the client's fault, same answer on any pod.
        return BackendError(
            details or "invalid request", retryable=False, pod=address, http_status=400
        )
    if code == grpc.StatusCode.ALREADY_EXISTS:  # a LoRA name that holds other files there
        return BackendError(details, retryable=False, pod=address, http_status=400)
    if code == grpc.StatusCode.NOT_FOUND:
        return BackendError(details, retryable=True, pod=address, http_status=404)
    return BackendError(
        f"{address}: {code.name if code else 'UNKNOWN'}: {details}",
        retryable=code in _RETRYABLE,
        pod=address,
        # An overloaded pod (queue timeout) is the service being unavailable, not broken.
        http_status=503 if code == grpc.StatusCode.RESOURCE_EXHAUSTED else 502,
    )


def cancelled_by_close() -> bool:
    """Whether a ``CancelledError`` out of a grpc.aio call came from its channel being closed
    (the pool closed it: the pod left), not from our own task being cancelled (the client went
    away, which must go on propagating). grpc.aio raises the same exception for both."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def closed_error(address: str) -> BackendError:
    """A call on a pod whose channel the pool closed (the pod left the endpoint set after the
    request was routed to it): another pod can take the request."""
    return BackendError(f"{address}: the pod left the pool", retryable=True, pod=address)


class EngineClient:
    """Async stubs of one pod, sharing one channel.

    A call on a closed channel (``grpc.aio.UsageError``: the pool closed it because the pod left),
    or one in flight when it closed (``CancelledError``), is a retryable ``BackendError`` like a
    pod that is down, never an unexpected exception.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
        self._prefill = pb_grpc.PrefillServiceStub(self.channel)
        self._decode = pb_grpc.DecodeServiceStub(self.channel)
        self._engine = pb_grpc.EngineServiceStub(self.channel)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """A call on this pod: its failures become ``BackendError`` (see ``to_backend_error``),
        as does a closed channel, or a call in flight when the pool closed it (``closed_error``);
        a cancellation of our own task goes on propagating."""
        try:
            yield
        except grpc.RpcError as err:
            raise to_backend_error(err, self.address) from err
        except grpc.aio.UsageError as err:
            raise closed_error(self.address) from err
        except asyncio.CancelledError as err:
            if cancelled_by_close():
                raise closed_error(self.address) from err
            raise

    async def prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillResponse:
        with self._call():
            return await self._prefill.Prefill(
                request, timeout=timeout, metadata=outgoing_metadata()
            )

    async def info(self, timeout: float = 10.0) -> pb.EngineInfo:
        """The pod's model facts (tokenizer, limits, KV compatibility)."""
        with self._call():
            return await self._engine.GetInfo(pb.EngineInfoRequest(), timeout=timeout)

    async def abort_prefill(self, request_ids: list[str], timeout: float = 2.0) -> int:
        """Stop prefills and release their KV leases (best effort, like ``abort``)."""
        try:
            reply = await self._prefill.Abort(
                pb.AbortRequest(request_ids=request_ids),
                timeout=timeout,
                metadata=outgoing_metadata(),
            )
        except (grpc.RpcError, grpc.aio.UsageError):
            return 0
        return reply.num_aborted

    def generate(self, request: pb.GenerateRequest, span=None) -> grpc.aio.UnaryStreamCall:
        """The raw stream call: the caller iterates it and may ``cancel()`` it (client gone);
        ``span``: the trace span the pod's spans go under (default: the current one)."""
        with self._call():
            return self._decode.Generate(request, metadata=outgoing_metadata(span))

    async def iterate(self, call: grpc.aio.UnaryStreamCall) -> AsyncIterator[pb.GenerateResponse]:
        with self._call():
            async for message in call:
                yield message

    async def abort(self, request_ids: list[str], timeout: float = 2.0) -> int:
        try:
            reply = await self._decode.Abort(
                pb.AbortRequest(request_ids=request_ids),
                timeout=timeout,
                metadata=outgoing_metadata(),
            )
        except (grpc.RpcError, grpc.aio.UsageError):
            return 0  # best effort: the cancelled stream already told the pod
        return reply.num_aborted

    async def load_lora_adapter(
        self, name: str, path: str, int_id: int = 0, timeout: float = 120.0
    ) -> pb.LoRAAdapter:
        """Load an adapter on this pod (reading its files can take a while on a hub)."""
        request = pb.LoadLoRAAdapterRequest(lora_name=name, lora_path=path, lora_int_id=int_id)
        with self._call():
            return await self._engine.LoadLoRAAdapter(request, timeout=timeout)

    async def unload_lora_adapter(self, name: str, timeout: float = 10.0) -> bool:
        request = pb.UnloadLoRAAdapterRequest(lora_name=name)
        with self._call():
            return (await self._engine.UnloadLoRAAdapter(request, timeout=timeout)).unloaded

    async def stats(self, timeout: float = 2.0) -> pb.EngineStats:
        with self._call():
            return await self._engine.GetStats(pb.StatsRequest(), timeout=timeout)

    def subscribe_kv_events(self, snapshot: bool = True) -> grpc.aio.UnaryStreamCall:
        return self._engine.SubscribeKVEvents(pb.SubscribeKVEventsRequest(snapshot=snapshot))

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with ``grace``, RPCs in flight may finish for that long first
        (closing cancels them, and a cancelled grpc.aio call raises CancelledError, not
        RpcError, in whoever is reading it)."""
        await self.channel.close(grace=grace)
