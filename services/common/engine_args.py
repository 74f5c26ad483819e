"""Command-line flags shared by the prefill and decode servers, mapped onto EngineConfig."""

from __future__ import annotations

import argparse
import os
import socket

from splitserve.engine.config import QUANTIZATIONS, CacheConfig, EngineConfig, SchedulerConfig
from splitserve.engine.lora.config import LoRAConfig
from splitserve.engine.performance_mode import (
    PERFORMANCE_MODES,
    QUANTIZATION_OFF,
    speculative_flag,
)
from splitserve.engine.performance_mode import resolve as resolve_mode
from splitserve.observability.logs import LOG_FORMATS
from splitserve.protocol.constants import ENGINE_GRPC_PORT
from splitserve.services.common.drain import DEFAULT_DRAIN_SECONDS

# A request that waited this long without running is dropped (RESOURCE_EXHAUSTED): a server
# never lets a request wait forever. The offline LLM has no limit.
DEFAULT_MAX_QUEUE_SECONDS = 120.0


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of both engine servers; defaults come from the engine's config dataclasses."""
    cache, sched = CacheConfig(), SchedulerConfig()
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    parser.add_argument("--revision", default="", help="weights revision (part of the KV hash)")
    parser.add_argument("--served-name", default=None, help="model name reported to clients")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quantization", default=None, choices=(QUANTIZATION_OFF, *QUANTIZATIONS),
        help="keep weights quantized: int8 (weight-only, per channel), w8a8 (int8 activations "
        "too), gguf (the GGUF file's own blocks); none: the model dtype (default: the "
        "performance mode's, else none)",
    )  # fmt: skip
    parser.add_argument("--block-size", type=int, default=cache.block_size)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--kv-cache-memory-gb", type=float, default=cache.kv_cache_memory_bytes / (1 << 30)
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--performance-mode", default=None, choices=PERFORMANCE_MODES,
        help="defaults for batch limits, token budget, speculation and quantization "
        "(docs/performance.md); explicit flags override them",
    )  # fmt: skip
    parser.add_argument(
        "--max-num-seqs", type=int, default=None,
        help=f"sequences per step (default: the performance mode's, else {sched.max_num_seqs})",
    )  # fmt: skip
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="tokens per step (default: the performance mode's, else "
        f"{sched.max_num_batched_tokens})",
    )  # fmt: skip
    parser.add_argument(
        "--speculative-config", default=None, metavar="JSON", type=speculative_flag,
        help='vLLM\'s speculative_config, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4}\'; "none": off (default: the performance mode\'s, else off)',
    )  # fmt: skip
    parser.add_argument(
        "--max-queue-seconds", type=float, default=DEFAULT_MAX_QUEUE_SECONDS,
        help="drop a request that waited this long without running (0: never)",
    )  # fmt: skip
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--attention-backend", default="auto", choices=["auto", "cpu", "torch", "triton"]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=ENGINE_GRPC_PORT, help="gRPC port")
    parser.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP"),
        help="address peers dial for KV reads (default: $POD_IP, else --host)",
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics (0: off)")
    parser.add_argument("--engine-id", default=os.environ.get("POD_NAME") or socket.gethostname())
    parser.add_argument("--kv-transport", default="grpc", choices=["nixl", "grpc"])
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("SPLITSERVE_THREADS", "0")),
        help="torch CPU threads (0: torch's default). Pods sharing few cores should split them.",
    )
    parser.add_argument(
        "--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS,
        help="on SIGTERM, refuse new requests and let those in flight (and, on prefill, live "
        "KV leases) finish for up to this long before exiting",
    )  # fmt: skip
    lora = LoRAConfig()
    parser.add_argument(
        "--enable-lora", action="store_true", help="serve LoRA adapters (vLLM's flag)"
    )
    parser.add_argument(
        "--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
        help="adapters to load at start (PEFT directories; vLLM's JSON form also accepted); "
        "implies --enable-lora",
    )  # fmt: skip
    parser.add_argument(
        "--lora-modules-file", default=None, metavar="PATH",
        help="JSON list of {name, path}, watched: adapters it adds are loaded and those it "
        "drops unloaded, without a restart (the operator mounts one); implies --enable-lora",
    )  # fmt: skip
    parser.add_argument("--max-loras", type=int, default=lora.max_loras,
                        help="distinct adapters one batch may mix (resident slots)")  # fmt: skip
    parser.add_argument("--max-lora-rank", type=int, default=lora.max_lora_rank)
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="unused adapters kept in memory (default: all)")  # fmt: skip
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text, or JSON lines (request id, role, engine id on each)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    settings = resolve_mode(
        args.performance_mode,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        **({} if args.speculative_config is None else {"speculative": args.speculative_config}),
        **({} if args.quantization is None else {"quantization": args.quantization}),
        device=args.device,
    )
    return EngineConfig(
        model=args.model,
        revision=args.revision or None,
        dtype=args.dtype,
        device=args.device,
        quantization=settings.quantization,
        attention_backend=args.attention_backend,
        max_model_len=args.max_model_len,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_memory_bytes=int(args.kv_cache_memory_gb * (1 << 30)),
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_queue_seconds=args.max_queue_seconds or None,
        ),
        speculative=settings.speculative,
        performance_mode=args.performance_mode,
        lora=lora_config(args),
    )


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    if not (args.enable_lora or args.lora_modules or args.lora_modules_file):
        return None
    return LoRAConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras)


def advertised_address(args: argparse.Namespace, port: int) -> str:
    host = args.advertise_host or args.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"
