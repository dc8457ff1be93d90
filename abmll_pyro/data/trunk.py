"""The frozen-trunk cache and logits only where scored.

When the lowest adapted module of an LM lies in block ``j > 0``, the hidden states entering block
``j`` do not depend on any adapter state: h_j = blocks[<j](embed(x)) with frozen weights. They are
computed once per example under ``no_grad`` and kept (:class:`TrunkCache`, a bounded LRU in memory
with an optional on-disk copy); every later pass — inner steps, query passes, posterior samples,
every adapting method — runs only blocks ``j..``, the final norm and the head::

    full pass:    logits = head(norm(blocks[j:](blocks[:j](embed(x)))))
    cached pass:  logits = head(norm(blocks[j:](h_j)))           h_j from the cache (exact)

``j`` is found at call time (:func:`first_live_block`): the lowest block holding an active ΔW, a
trainable parameter or a forward hook (the embedding counts as block 0), so a stale cache is never
read. Entries are keyed per row by the row's content (tokens, positions, its attention-mask
rows), ``j`` and the dtype, and the whole cache is dropped when any frozen weight changes in place.

The cache is opt-in per model (:func:`attach_trunk_cache`; ``RunConfig.trunk_cache`` turns it on
for runs). Models without a :class:`~abmll_pyro.data.decoder.Decoder` are scored the old way.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..lora.layer import BayesLoRALayer
from .decoder import Decoder, decoder_of

__all__ = ["TrunkCache", "attach_trunk_cache", "trunk_cache_of", "first_live_block", "final_hidden", "scored_logits"]

_ATTR = "_abmll_trunk_cache"


class TrunkCache:
    """Per-row hidden states entering block ``j``; LRU-bounded to ``max_bytes`` in memory.

    ``directory``: also keep every entry on disk under ``directory/<weights fingerprint>/`` (read back
    when it falls out of memory or in a later process). ``hits``/``misses`` count rows.
    """

    def __init__(self, max_bytes: int = 1 << 30, directory: str | Path | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.directory = max_bytes, None if directory is None else Path(directory)
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._signature: tuple | None = None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    # ----------------------------------------------------------------- validity
    def check_weights(self, decoder: Decoder) -> None:
        """Drop everything when a frozen weight was replaced or changed in place (``_version``)."""
        signature = tuple((id(p), p._version) for p in decoder.base.parameters())
        if signature != self._signature:
            self.clear()
            self._signature, self._fingerprint = signature, None

    def _dir(self, decoder: Decoder) -> Path:
        if self._fingerprint is None:
            digest = hashlib.blake2b(json.dumps(decoder.config.to_dict(), sort_keys=True, default=str).encode(),
                                     digest_size=16)
            with torch.no_grad():
                for name, p in decoder.base.named_parameters():
                    q = p.detach().double()
                    digest.update(f"{name}{tuple(p.shape)}{p.dtype}{float(q.sum())}{float(q.abs().sum())}".encode())
            self._fingerprint = digest.hexdigest()
        return self.directory / self._fingerprint

    # ----------------------------------------------------------------- storage
    def get(self, key: str, decoder: Decoder) -> Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            return value
        if self.directory is not None:
            path = self._dir(decoder) / f"{key}.pt"
            if path.exists():
                value = torch.load(path, map_location=decoder.base.device if hasattr(decoder.base, "device") else "cpu")
                self._remember(key, value)
        return value

    def put(self, key: str, value: Tensor, decoder: Decoder) -> None:
        self._remember(key, value)
        if self.directory is not None:
            folder = self._dir(decoder)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{key}.tmp"
            torch.save(value.cpu(), tmp)
            tmp.replace(folder / f"{key}.pt")

    def _remember(self, key: str, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    # ----------------------------------------------------------------- the trunk
    def hidden_in(self, decoder: Decoder, j: int, input_ids: Tensor, attention_mask: Tensor | None,
                  position_ids: Tensor, lengths: Tensor) -> Tensor:
        """``[n, L, H]`` hidden states entering block ``j`` (zeros at padding positions ``>= lengths``)."""
        self.check_weights(decoder)
        n, width = input_ids.shape
        positions = position_ids.expand(n, -1)
        dtype = next(decoder.base.parameters()).dtype
        keys = [_row_key(j, dtype, input_ids[r], positions[r], attention_mask, r, int(lengths[r])) for r in range(n)]
        rows: list[Tensor | None] = [self.get(k, decoder) for k in keys]
        missing = [r for r in range(n) if rows[r] is None]
        self.hits += n - len(missing)
        self.misses += len(missing)
        if missing:
            computed = _trunk(decoder, j, input_ids, attention_mask, positions, lengths, missing)
            for r, value in zip(missing, computed):
                rows[r] = value
                self.put(keys[r], value, decoder)
        first = rows[0]
        out = first.new_zeros((n, width, first.shape[-1]))
        for r, value in enumerate(rows):
            out[r, : value.shape[0]] = value.to(out.device)
        return out


def _bytes(t: Tensor) -> bytes:
    """The raw bytes of ``t`` (any dtype, bf16 included: numpy has none, so view them as uint8)."""
    t = t.detach().cpu().contiguous()
    return (t.view(torch.uint8) if t.dtype != torch.bool and t.dim() else t).numpy().tobytes()


def _row_key(j: int, dtype: torch.dtype, ids: Tensor, pos: Tensor, mask: Tensor | None, r: int, length: int) -> str:
    digest = hashlib.blake2b(f"{j}|{dtype}|{length}".encode(), digest_size=20)
    for part in (ids[:length], pos[:length]):
        digest.update(_bytes(part))
    if mask is not None:
        row = mask[r, :, :length, :length] if mask.ndim == 4 else mask[r, :length]
        digest.update(str(row.dtype).encode() + _bytes(row))
    return digest.hexdigest()


@torch.no_grad()
def _trunk(decoder: Decoder, j: int, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor,
           lengths: Tensor, rows: list[int]) -> list[Tensor]:
    """Blocks ``< j`` on the given rows only, trimmed to their longest valid length."""
    index = torch.as_tensor(rows, device=input_ids.device)
    width = int(lengths[index].max())
    ids, pos = input_ids[index, :width], positions[index, :width]
    mask = None
    if attention_mask is not None:
        mask = attention_mask[index, :, :width, :width] if attention_mask.ndim == 4 else attention_mask[index, :width]
    h = decoder.embed(ids, pos)
    h = decoder.run(h, decoder.prepare(h, mask, pos), pos, 0, j)
    return [h[k, : int(lengths[r])].clone() for k, r in enumerate(rows)]


def attach_trunk_cache(lm: nn.Module, cache: TrunkCache | None = None) -> TrunkCache:
    """Give ``lm`` a trunk cache (a new one by default) that scoring will use; returns it."""
    cache = cache if cache is not None else TrunkCache()
    lm.__dict__[_ATTR] = cache
    return cache


def detach_trunk_cache(lm: nn.Module) -> None:
    lm.__dict__.pop(_ATTR, None)


def trunk_cache_of(lm: nn.Module) -> TrunkCache | None:
    return lm.__dict__.get(_ATTR)


def first_live_block(decoder: Decoder) -> int:
    """The lowest block whose output may differ from the frozen model's: it holds an active ΔW, a
    trainable parameter or a forward hook. 0 if the embedding is trainable; ``num_blocks`` if none."""
    in_blocks = {id(p) for p in decoder.blocks.parameters()} | {id(p) for p in decoder.final_norm.parameters()}
    if any(p.requires_grad for p in decoder.base.parameters() if id(p) not in in_blocks):
        return 0
    for i in range(decoder.num_blocks):
        for m in decoder.blocks[i].modules():
            if (isinstance(m, BayesLoRALayer) and m.delta is not None) or m._forward_hooks or m._forward_pre_hooks:
                return i
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                return i
    return decoder.num_blocks


def final_hidden(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None,
                 lengths: Tensor | None = None) -> Tensor | None:
    """``[n, L, H]`` final (normed) hidden states, through the trunk cache when ``lm`` has one and its
    lowest live block is above 0; None when ``lm`` has no supported decoder. ``lengths``: ``[n]``
    valid prefix of each row (the rest is padding whose outputs are never read)."""
    decoder = decoder_of(lm)
    if decoder is None:
        return None
    cache = trunk_cache_of(lm)
    j = first_live_block(decoder) if cache is not None else 0
    if j == 0:
        return decoder.hidden(input_ids, attention_mask, position_ids)
    pos = decoder.positions(input_ids, position_ids)
    if lengths is None:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
    h = cache.hidden_in(decoder, j, input_ids, attention_mask, pos, lengths)
    h = decoder.run(h, decoder.prepare(h, attention_mask, pos), pos, j, decoder.num_blocks)
    return decoder.final_norm(h)


def scored_logits(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None,
                  lengths: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """One LM pass; returns ``at(rows, cols) -> [P, V]`` logits at positions ``(rows[p], cols[p])``.

    The vocabulary head runs only on the positions asked for (never on the whole ``[n, L, V]``)."""
    hidden = final_hidden(lm, input_ids, attention_mask, position_ids, lengths)
    if hidden is None:  # unsupported family: the model's own logits
        logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return lambda rows, cols: logits[rows, cols]
    head = lm.get_output_embeddings()
    return lambda rows, cols: head(hidden[rows, cols])
