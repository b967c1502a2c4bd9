"""Prefix reuse: the KV rows of finished sequences kept by content, so that a prompt which starts the
same way (a conversation's earlier turns, or the same system prompt and image as another request)
has only its new tokens prefilled.

A position's key is what determines its K/V given the positions before it: its token id, or for
the image's positions (the image's hash, the index). Keys are exact (no hash of a hash can
collide), so a conversation whose earlier turn was edited matches only up to the edit.

The rows are kept in pages of PAGE_TOKENS positions (vLLM's block size), in one pool allocated
once from the decoder's executor (host memory for ONNX Runtime, device memory for TensorRT):
`budget_bytes // page_bytes` pages. A page is keyed by (its parent page, its positions' keys),
so pages form a tree: sequences that share a prefix share its pages, and a page is found by
walking from the root. A sequence's last, partial page is kept too, and a prompt may reuse the
first positions of any page that parts from it midway, so reuse is exact to the token. Pages are
evicted least recently used first, leaves only (a page with children is the prefix of a kept one).

Restoring copies a prefix's rows into the joining sequence's slot before its prompt is prefilled
after them (so the decoder must take a prefill after a past: DecoderPlan.chunked_prefill); storing
copies a finished sequence's rows out of its slot before the slot is reused. Both are one Copy2D
per page, layer and K/V, on the scheduler's thread (on the device's stream with TensorRT), never per
step. At least one prompt position is always prefilled: its logits give the first token.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from mvlm_compile.runtime.kv_cache import Copy2D, DecoderLoop

PAGE_TOKENS = 16

PositionKey = Hashable  # a token id, or (image hash, index) at the image's positions


def position_keys(
    prompt_ids: Sequence[int], image_token_index: int, image_key: str | None, image_tokens: int
) -> list[PositionKey]:
    """The key of each prompt position: the image token stands for `image_tokens` positions."""
    keys: list[PositionKey] = []
    for token in prompt_ids:
        if token == image_token_index:
            keys.extend((image_key, i) for i in range(image_tokens))
        else:
            keys.append(token)
    return keys


@dataclass(eq=False)
class _Page:
    index: int  # in the pool
    parent: _Page | None
    keys: tuple  # its positions' keys: PAGE_TOKENS, or fewer for a sequence's last page
    used: int  # the cache's clock when last stored or restored
    children: set[_Page] = field(default_factory=set)


@dataclass(frozen=True)
class PrefixCacheInfo:
    pages: int  # the pool's pages (0: no prefix reuse)
    pages_used: int
    page_tokens: int
    page_bytes: int
    lookups: int  # prompts looked up
    hits: int  # prompts that reused a prefix
    reused_tokens: int  # prompt tokens not prefilled, summed


def _common(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Pages of K/V rows in the executor's memory, keyed by content; used from the scheduler's thread."""

    def __init__(self, loop: DecoderLoop, budget_bytes: int, page_tokens: int = PAGE_TOKENS) -> None:
        plan = loop.plan
        self.loop, self.page_tokens = loop, page_tokens
        self.page_bytes = plan.sequence_bytes(page_tokens)
        self.capacity = max(0, budget_bytes) // self.page_bytes
        self.base = loop.executor.allocate(self.capacity * self.page_bytes) if self.capacity else 0
        self._free = list(range(self.capacity - 1, -1, -1))
        self._pages: dict[tuple[_Page | None, tuple], _Page] = {}
        self._roots: set[_Page] = set()
        self._clock = 0
        self.lookups = self.hits = self.reused_tokens = 0

    def info(self) -> PrefixCacheInfo:
        return PrefixCacheInfo(
            self.capacity,
            len(self._pages),
            self.page_tokens,
            self.page_bytes,
            self.lookups,
            self.hits,
            self.reused_tokens,
        )

    def restore(self, slot: int, keys: Sequence[PositionKey]) -> int:
        """Copy the longest kept prefix of a prompt (its positions' `keys`, all but the last at most)
        into the empty `slot`: the positions restored."""
        self.lookups += 1
        limit, p = len(keys) - 1, self.page_tokens
        chain: list[tuple[_Page, int]] = []
        parent: _Page | None = None
        while len(chain) * p + p <= limit:
            page = self._pages.get((parent, tuple(keys[len(chain) * p : len(chain) * p + p])))
            if page is None:
                break
            chain.append((page, p))
            parent = page
        start = len(chain) * p
        rest = keys[start:limit]
        best = max(self._children(parent), key=lambda page: _common(page.keys, rest), default=None)
        if best is not None and (common := _common(best.keys, rest)):
            chain.append((best, common))
        if not chain:
            return 0
        restored = sum(count for _, count in chain)
        self._touch(page for page, _ in chain)
        self.loop.executor.copy_2d(
            [copy for i, (page, count) in enumerate(chain) for copy in self._copies(page, i * p, slot, count, True)]
        )
        self.loop.lengths[slot] = restored
        self.hits += 1
        self.reused_tokens += restored
        return restored

    def store(self, slot: int, keys: Sequence[PositionKey]) -> None:
        """Keep the sequence in `slot` (the keys of its positions, at least as many as it holds),
        copying the pages not kept yet; stops where no page is free or evictable."""
        length = self.loop.lengths[slot]
        parent: _Page | None = None
        chain: set[_Page] = set()  # this sequence's pages: not evicted for its own later pages
        for start in range(0, length, self.page_tokens):
            page_keys = tuple(keys[start : min(length, start + self.page_tokens)])
            page = self._pages.get((parent, page_keys))
            if page is None:
                index = self._take_page(chain)
                if index is None:
                    return
                page = _Page(index, parent, page_keys, self._clock)
                self._pages[(parent, page_keys)] = page
                self._children(parent).add(page)
                self.loop.executor.copy_2d(self._copies(page, start, slot, len(page_keys), False))
            chain.add(page)
            self._touch([page])
            parent = page

    def _children(self, parent: _Page | None) -> set[_Page]:
        return self._roots if parent is None else parent.children

    def _touch(self, pages) -> None:
        self._clock += 1
        for page in pages:
            page.used = self._clock

    def _take_page(self, keep: set[_Page]) -> int | None:
        """A free page's index, evicting the least recently used leaf outside `keep` if none is free."""
        if self._free:
            return self._free.pop()
        leaves = [page for page in self._pages.values() if not page.children and page not in keep]
        if not leaves:
            return None
        victim = min(leaves, key=lambda page: page.used)
        del self._pages[(victim.parent, victim.keys)]
        self._children(victim.parent).discard(victim)
        return victim.index

    def _copies(self, page: _Page, start: int, slot: int, count: int, restore: bool) -> list[Copy2D]:
        """`count` rows of each layer's K and V between the page and the slot's positions from `start`."""
        plan, loop = self.loop.plan, self.loop
        sb = plan.slot_bytes
        copies = []
        for layer in range(plan.layers):
            for kind in (0, 1):
                paged = self.base + page.index * self.page_bytes + (2 * layer + kind) * self.page_tokens * sb
                cached = loop.base + plan.cell(layer, kind, start, slot)
                if restore:
                    copies.append(Copy2D(cached, plan.row_bytes, paged, sb, sb, count))
                else:
                    copies.append(Copy2D(paged, sb, cached, plan.row_bytes, sb, count))
        return copies
