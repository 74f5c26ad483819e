"""The fast KV transport: NIXL (UCX) one-sided READs from the source's registered pool.

Each side registers its whole pool with a NIXL agent once. The source publishes its agent
metadata, the pool's base address and size (``NixlEndpoint``) at handshake; the sink prepares one
descriptor per block of both pools once per peer, and a pull is a single ``READ`` of
``len(block_ids)`` descriptors straight into the destination blocks: no staging copy, no work on
the source's CPU (on a real cluster the NIC does it over RDMA; on one host UCX uses CMA,
``process_vm_readv``).

The agent name carries the source's epoch, so a restarted source is a different NIXL peer and an
old hand-off can never reach the new pool. NIXL is an optional dependency: it is imported lazily
and its absence surfaces as ``TransportUnavailableError("nixl unavailable: ...")``.

Throughput (docs/protocol.md, "NIXL tuning"): with 4 KiB pages UCX's CMA path ran at 2-3 GB/s
for 94 MB reads here; backing both pools with transparent huge pages (``allocate_kv_pool`` or
``THP_MEM_ALLOC_ENABLE=1`` for torch's allocator) lifts it to ~6-7 GB/s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from splitserve.kvtransfer.errors import (
    KVTransferError,
    PeerUnreachableError,
    TransferTimeoutError,
    TransportUnavailableError,
)
from splitserve.kvtransfer.pool import KVPool
from splitserve.kvtransfer.transport import KVBlockSink
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Poll without sleeping for this long first: a few-block read takes tens of microseconds, less
# than one sleep's wake-up latency.
_SPIN_SECONDS = 0.0005


def nixl_available() -> tuple[bool, str]:
    """``(True, "")`` if NIXL can be imported, else ``(False, why)``."""
    try:
        import nixl._api  # noqa: F401
    except Exception as error:  # ImportError, or a broken native library
        return False, f"{type(error).__name__}: {error}"
    return True, ""


def _new_agent(name: str) -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as error:
        raise TransportUnavailableError(f"nixl unavailable: {error}") from error
    try:
        # No NIXL progress thread: it busy-polls (pthrDelay=0), burning ~half a core per process
        # on this 2-core host and halving transfer speed. Readers progress while they poll their
        # transfer; sources run a slow progress loop of their own (NixlSource).
        return nixl_agent(name, nixl_agent_config(backends=["UCX"], enable_prog_thread=False))
    except Exception as error:
        raise TransportUnavailableError(f"nixl unavailable: UCX backend failed: {error}") from error


def _mem_type(pool: KVPool) -> str:
    return "DRAM" if pool.is_cpu else "VRAM"


def _device_id(pool: KVPool) -> int:
    return 0 if pool.is_cpu else (pool.kv_cache.device.index or 0)


def _block_descs(base: int, num_blocks: int, block_nbytes: int, dev: int) -> list[tuple]:
    return [(base + i * block_nbytes, block_nbytes, dev) for i in range(num_blocks)]


class NixlSource:
    """Registers a source pool with NIXL and describes it for readers.

    Reads are one-sided, but a new reader's connection set-up (UCX wire-up) needs the source's
    worker to make progress: a daemon thread does that every ``progress_interval`` seconds,
    which costs ~nothing when idle (unlike NIXL's own busy-polling progress thread).
    """

    def __init__(self, pool: KVPool, agent_name: str, progress_interval: float = 0.002) -> None:
        self.pool = pool
        self.agent_name = agent_name
        self.agent = _new_agent(agent_name)
        self._reg = self.agent.register_memory(pool.kv_cache, _mem_type(pool))
        self._metadata: bytes = self.agent.get_agent_metadata()
        self._stop = threading.Event()
        self._progress = threading.Thread(
            target=self._progress_loop, args=(progress_interval,), name="nixl-progress", daemon=True
        )
        self._progress.start()

    def _progress_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.agent.get_new_notifs()  # drives the UCX worker's progress
            except Exception:
                log.debug("nixl progress failed", exc_info=True)

    def endpoint(self) -> pb.NixlEndpoint:
        return pb.NixlEndpoint(
            agent_name=self.agent_name,
            agent_metadata=self._metadata,
            base_addr=self.pool.base_addr,
            device_id=_device_id(self.pool),
            mem_type=_mem_type(self.pool),
            num_blocks=self.pool.num_blocks,
        )

    def close(self) -> None:
        self._stop.set()
        self._progress.join(timeout=5)
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:  # shutting down: nothing useful to do
            log.debug("nixl deregister failed", exc_info=True)


class NixlBlockSink(KVBlockSink):
    """Pulls blocks with NIXL READs into a registered local pool.

    The lease is checked (and extended) over gRPC right before the READ, since a one-sided read
    cannot be refused by the source; checksums then prove the bytes are the hand-off's.
    """

    transport = "nixl"

    def __init__(self, pool: KVPool, agent_name: str, poll_interval: float = 50e-6) -> None:
        super().__init__(pool)
        self.agent = _new_agent(agent_name)
        self._reg = self.agent.register_memory(pool.kv_cache, _mem_type(pool))
        local = _block_descs(pool.base_addr, pool.num_blocks, pool.block_nbytes, _device_id(pool))
        self._local = self.agent.prep_xfer_dlist("", local, _mem_type(pool))
        self._peers: dict[str, Any] = {}  # remote agent name -> prepped remote dlist handle
        # The agent is not thread-safe without a progress thread (sync mode NONE): every call
        # on it holds this lock; concurrent pulls interleave their polls.
        self._lock = threading.RLock()
        self._poll_interval = poll_interval

    def read(
        self,
        stub: pb_grpc.KVServiceStub,
        handoff: pb.KVHandoff,
        endpoint: pb.TransportEndpoints,
        dst_block_ids: Sequence[int],
        deadline: float,
    ) -> None:
        nixl = endpoint.nixl
        try:
            self._read(nixl, handoff, dst_block_ids, deadline)
        except KVTransferError:
            raise
        except Exception as error:  # NIXL raises e.g. nixlRemoteDisconnectError for a dead peer
            self._forget(nixl.agent_name)
            raise PeerUnreachableError(
                f"NIXL read from {nixl.agent_name} failed: {type(error).__name__}: {error}"
            ) from error

    def _read(
        self,
        nixl: pb.NixlEndpoint,
        handoff: pb.KVHandoff,
        dst_block_ids: Sequence[int],
        deadline: float,
    ) -> None:
        remote = self._peer(nixl)
        with self._lock:
            handle = self.agent.make_prepped_xfer(
                "READ", self._local, list(dst_block_ids), remote, list(handoff.block_ids)
            )
        try:
            with self._lock:
                state = self.agent.transfer(handle)
            spin_until = time.monotonic() + _SPIN_SECONDS
            while state not in ("DONE", "ERR"):
                now = time.monotonic()
                if now > deadline:
                    raise TransferTimeoutError(
                        f"NIXL read of {len(dst_block_ids)} blocks from {nixl.agent_name} "
                        "passed its deadline"
                    )
                if now > spin_until:  # small reads finish while spinning; long ones yield CPU
                    time.sleep(self._poll_interval)
                with self._lock:
                    state = self.agent.check_xfer_state(handle)  # also progresses the worker
            if state == "ERR":
                self._forget(nixl.agent_name)
                raise PeerUnreachableError(f"NIXL read from {nixl.agent_name} failed")
        finally:
            try:
                with self._lock:
                    self.agent.release_xfer_handle(handle)  # aborts the transfer if running
            except Exception:
                log.debug("nixl release_xfer_handle failed", exc_info=True)

    def _peer(self, nixl: pb.NixlEndpoint) -> Any:
        with self._lock:
            handle = self._peers.get(nixl.agent_name)
            if handle is None:
                if not nixl.agent_metadata:
                    raise TransportUnavailableError(f"no NIXL metadata for {nixl.agent_name}")
                name = self.agent.add_remote_agent(nixl.agent_metadata)
                descs = _block_descs(
                    nixl.base_addr, nixl.num_blocks, self.pool.block_nbytes, nixl.device_id
                )
                handle = self.agent.prep_xfer_dlist(name, descs, nixl.mem_type or "DRAM")
                self._peers[nixl.agent_name] = handle
            return handle

    def _forget(self, agent_name: str) -> None:
        with self._lock:
            handle = self._peers.pop(agent_name, None)
            if handle is None:
                return
            try:
                self.agent.release_dlist_handle(handle)
                self.agent.remove_remote_agent(agent_name)
            except Exception:
                log.debug("nixl forget %s failed", agent_name, exc_info=True)

    def close(self) -> None:
        for name in list(self._peers):
            self._forget(name)
        with self._lock:
            try:
                self.agent.release_dlist_handle(self._local)
                self.agent.deregister_memory(self._reg)
            except Exception:
                log.debug("nixl sink close failed", exc_info=True)
