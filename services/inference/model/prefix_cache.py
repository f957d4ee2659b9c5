"""The L1 cache of the platform: KV-cache blocks of prompt prefixes, reused across requests.

Requests of one application usually share a long prefix (the system prompt, few-shot
examples, a retrieved document). Prefilling it again for each request is the largest
part of time to first token; this cache keeps the keys and values of prompt prefixes
in blocks of ``block`` tokens, so a new prompt starting with a cached prefix only
prefills the rest.

A block is found by a digest chained over every token before it, so a block is reused
only after exactly the same tokens from the start of the prompt. Blocks are evicted
least-recently-used when the cache exceeds ``max_bytes``. A prompt's last token is
never taken from the cache: it must run through the model to give the first logits.

Shapes: L layers, K kv heads, D head dim, n tokens of one block.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.inference.model.llama import KVCache


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 16) -> None:
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.block = block
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = PrefixStats()
        # digest of the tokens up to and including a block -> its (k, v) [L, K, n, D]
        self._blocks: collections.OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._blocks)

    def _digests(self, prompt: Sequence[int]) -> list[bytes]:
        """One digest per whole block of ``prompt``, each covering all tokens before it."""
        digests: list[bytes] = []
        previous = b""
        for start in range(0, len(prompt) - self.block + 1, self.block):
            chunk = prompt[start : start + self.block]
            data = previous + b"".join(t.to_bytes(4, "little") for t in chunk)
            previous = hashlib.blake2b(data, digest_size=16).digest()
            digests.append(previous)
        return digests

    def load(self, prompt: Sequence[int], cache: KVCache, slot: int) -> int:
        """Copy the longest cached prefix of ``prompt`` into ``slot``; return its length.

        At most ``len(prompt) - 1`` tokens are reused. The slot's length is set to the
        returned count.
        """
        self.stats.lookups += 1
        reused = 0
        matched: list[bytes] = []
        for digest in self._digests(prompt[: max(len(prompt) - 1, 0)]):
            entry = self._blocks.get(digest)
            if entry is None:
                break
            matched.append(digest)
            k, v = entry
            cache.k[:, slot, :, reused : reused + self.block] = k
            cache.v[:, slot, :, reused : reused + self.block] = v
            reused += self.block
        self._touch(matched)
        cache.lengths[slot] = reused
        if reused:
            self.stats.hits += 1
            self.stats.reused_tokens += reused
        return reused

    def store(self, prompt: Sequence[int], cache: KVCache, slot: int) -> None:
        """Keep the whole blocks of ``prompt`` whose keys/values ``slot`` now holds."""
        if self.max_bytes <= 0:
            return
        digests = self._digests(prompt)
        for index, digest in enumerate(digests):
            if digest in self._blocks:
                continue
            start = index * self.block
            k = cache.k[:, slot, :, start : start + self.block].clone()
            v = cache.v[:, slot, :, start : start + self.block].clone()
            size = 2 * k.numel() * k.element_size()
            if size > self.max_bytes:
                return
            self._blocks[digest] = (k, v)
            self.bytes += size
            self.stats.stored_blocks += 1
        self._touch([d for d in digests if d in self._blocks])
        while self.bytes > self.max_bytes and self._blocks:
            _, (k, v) = self._blocks.popitem(last=False)
            self.bytes -= 2 * k.numel() * k.element_size()
            self.stats.evicted_blocks += 1

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a chain used, its first block most recently: eviction takes tails first."""
        for digest in reversed(chain):
            self._blocks.move_to_end(digest)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
