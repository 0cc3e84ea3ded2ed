"""The running batch's KV cache: rows join (left-padded to a common length) and leave at any
step. Tensors per layer are [batch, kv_heads, time, head_dim]; ``mask`` is [batch, time] with 1 for
real tokens and 0 for padding; ``positions`` is each row's next position id. Knows nothing of
adapters, requests or tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class KvBatch:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [batch, time] long
    positions: torch.Tensor  # [batch] long

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def from_cache(cls, cache, mask: torch.Tensor, positions: torch.Tensor) -> "KvBatch":
        return cls([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], mask, positions)

    @staticmethod
    def empty_cache():
        from transformers import DynamicCache

        return DynamicCache()

    def to_cache(self):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))

    def merge(self, other: "KvBatch") -> "KvBatch":
        """Rows of self followed by rows of other, left-padded to the same length."""
        length = max(self.length, other.length)
        a, b = length - self.length, length - other.length
        keys = [torch.cat([_pad_left(k1, a, 2), _pad_left(k2, b, 2)]) for k1, k2 in zip(self.keys, other.keys)]
        values = [torch.cat([_pad_left(v1, a, 2), _pad_left(v2, b, 2)]) for v1, v2 in zip(self.values, other.values)]
        mask = torch.cat([_pad_left(self.mask, a, 1), _pad_left(other.mask, b, 1)])
        return KvBatch(keys, values, mask, torch.cat([self.positions, other.positions]))

    def select(self, rows: list[int]) -> "KvBatch":
        """Keep only ``rows`` (in that order), then drop columns that are padding in every row."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        return KvBatch(
            [k.index_select(0, index)[:, :, start:] for k in self.keys],
            [v.index_select(0, index)[:, :, start:] for v in self.values],
            mask[:, start:],
            self.positions.index_select(0, index),
        )
