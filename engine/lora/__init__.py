"""Multi-LoRA serving: PEFT adapters read and checked (``peft_format``), registered and made
resident in ``max_loras`` slots (``manager``, ``slots``), applied to a whole step's batch as
three tensor ops per projection (``LoRAStep``)."""

from splitserve.engine.lora.config import LoRAConfig
from splitserve.engine.lora.manager import LoRAExistsError, LoRAManager, LoRANotFoundError
from splitserve.engine.lora.peft_format import AdapterError, LoadedAdapter, read_adapter
from splitserve.engine.lora.slots import LoRASlots, LoRAStep
from splitserve.protocol.lora import AdapterInfo, LoRARequest

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "LoRAConfig",
    "LoRAExistsError",
    "LoRAManager",
    "LoRANotFoundError",
    "LoRARequest",
    "LoRASlots",
    "LoRAStep",
    "LoadedAdapter",
    "read_adapter",
]
