"""splitserve: Kubernetes-native disaggregated LLM inference.

The offline API mirrors vLLM's: ``from splitserve import LLM, SamplingParams, LoRARequest``.
They are imported lazily so that light entry points (the operator, the router) never pay for torch.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from splitserve.engine.llm import LLM
    from splitserve.protocol.lora import LoRARequest
    from splitserve.protocol.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from splitserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from splitserve.protocol.sampling import SamplingParams

        return SamplingParams
    if name == "LoRARequest":
        from splitserve.protocol.lora import LoRARequest

        return LoRARequest
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
