"""What every attention backend needs to know about one step's batch (built once per step).

The runner orders the batch so that single-token sequences (decodes) come first, then the
multi-token ones (prefills, chunked or not). A request verifying draft tokens (speculative
decoding) is several decode rows, one per token, each with the block table of the request and a
sequence length that ends at its own position. Tensors live on the engine's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    # decode group: tokens [0, num_decode_tokens), one per sequence
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor  # [Bd] int32, context incl. the new token
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32
    # prefill group: tokens [num_decode_tokens, T)
    num_prefill_tokens: int
    prefill_query_start_loc: torch.Tensor  # [Bp + 1] int32, offsets into the prefill tokens
    prefill_seq_lens: torch.Tensor  # [Bp] int32, context incl. the new tokens
    prefill_block_tables: torch.Tensor  # [Bp, max_blocks] int32
    # Host-side copies of the few scalars backends size their work by (no device sync needed).
    decode_max_seq_len: int
    prefill_max_seq_len: int
    prefill_max_query_len: int
    prefill_has_context: bool  # False when every prefill starts at position 0

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens
