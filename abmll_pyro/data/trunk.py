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

**Shared on disk** (``directory``; runs get it from ``$ABMLL_TRUNK_DIR``, which ``abmll benchmark``
sets for all its runs): every run and process pointing at the folder reads the others' entries, so
the 26 frozen blocks run once per example for a whole benchmark instead of once per (method, seed,
example). A batched float32 pass gives a row slightly different round-off depending on which rows
share its batch, so with a directory every missing row is computed on its own (batch of one, its own
length): an entry is then a function of the row's content alone, and a run reads bit for bit what it
would have computed itself — its results do not depend on which run filled the cache first, or on how
many ran at once. The folder is keyed by the weights, the torch version, the device type and the
thread count (all of which change round-off). Without a directory rows are computed batched (faster
when nothing is shared; bit-identical within a process, within float round-off of the shared path).
The disk copy stops, with one warning, before it would leave less than 5 GiB (or 5% of the disk) free;
the run goes on with the memory cache. Rows of a model with nothing adapted (``j`` = the number of
blocks: pretrained, in-context learning) never go to the folder: no other method could read them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..lora.layer import BayesLoRALayer
from .decoder import Decoder, decoder_of

__all__ = ["TRUNK_DIR_ENV", "TrunkCache", "shared_trunk_dir", "attach_trunk_cache", "trunk_cache_of", "first_live_block", "final_hidden", "scored_logits"]

_ATTR = "_abmll_trunk_cache"
TRUNK_DIR_ENV = "ABMLL_TRUNK_DIR"  # a run's shared on-disk trunk folder (set by `abmll benchmark`, `--trunk-dir`)
MIN_FREE_BYTES = 5 << 30  # the disk copy stops (one warning) before it would leave less free than this or 5%
CHECK_FREE_EVERY = 256 << 20  # the free space is looked at once per this many bytes written, not per entry


class TrunkCache:
    """Per-row hidden states entering block ``j``; LRU-bounded to ``max_bytes`` in memory.

    ``directory``: also keep every entry on disk under ``directory/<weights fingerprint>-.../`` (read
    back when it falls out of memory, by another process, or in a later one; safe for several
    processes at once). Rows are then computed one at a time, so an entry does not depend on who
    computed it (module docstring). ``hits``/``misses`` count rows; ``disk_hits`` those read from disk.
    """

    def __init__(self, max_bytes: int = 1 << 30, directory: str | Path | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.directory = max_bytes, None if directory is None else Path(directory)
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = self.disk_hits = 0
        self._disk_ok = True  # cleared (with one warning) when the folder cannot be written
        self._signature: tuple | None = None
        self._fingerprint: str | None = None
        self._made: Path | None = None  # the folder made (mkdir once, not per entry)
        self._unchecked = 0  # bytes written since the free space was last looked at

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
        runtime = f"torch{torch.__version__}-{_device(decoder).type}-t{torch.get_num_threads()}"
        return self.directory / f"{self._fingerprint}-{runtime.replace('+', '_')}"

    # ----------------------------------------------------------------- storage
    def get(self, key: str, decoder: Decoder, disk: bool = True) -> Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            return value
        if self.directory is not None and disk:
            path = self._dir(decoder) / f"{key}.pt"
            if path.exists():
                try:
                    value = torch.load(path, map_location=_device(decoder), weights_only=True)
                except Exception:  # noqa: BLE001 - unreadable entry (a disk fault): recompute and rewrite it
                    return None
                self.disk_hits += 1
                self._remember(key, value)
        return value

    def put(self, key: str, value: Tensor, decoder: Decoder, disk: bool = True) -> None:
        self._remember(key, value)
        if self.directory is not None and disk and self._disk_ok:
            folder = self._dir(decoder)
            tmp = folder / f"{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # unique: other processes write too
            size = value.numel() * value.element_size()
            try:
                if self._made != folder:
                    folder.mkdir(parents=True, exist_ok=True)
                    self._made, self._unchecked = folder, CHECK_FREE_EVERY
                self._unchecked += size
                if self._unchecked >= CHECK_FREE_EVERY:  # look ahead one interval: never below the reserve
                    usage = shutil.disk_usage(folder)
                    reserve = max(MIN_FREE_BYTES, usage.total // 20)
                    if usage.free - CHECK_FREE_EVERY - size < reserve:
                        raise OSError(errno.ENOSPC, f"fewer than {reserve >> 30} GiB would be left free")
                    self._unchecked = 0
                value = value.detach().cpu()
                # a view would save its whole storage: copy only then (_trunk's rows are already compact)
                torch.save(value if value.is_contiguous() and value.untyped_storage().nbytes() == size
                           else value.clone(), tmp)
                tmp.replace(folder / f"{key}.pt")  # atomic: a reader sees a whole entry or none
            except OSError as err:  # e.g. a full disk: the run goes on with the memory cache alone
                self._disk_ok = False
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                warnings.warn(f"trunk cache: cannot write {folder} ({err}); going on without the disk copy")

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
        # the folder holds states below adapted blocks; a model with nothing adapted (pretrained, icl) is
        # its own "trunk" through the last block, shared with no other method: kept in memory only
        shared = self.directory is not None and j < decoder.num_blocks
        rows: list[Tensor | None] = [self.get(k, decoder, shared) for k in keys]
        missing = [r for r in range(n) if rows[r] is None]
        self.hits += n - len(missing)
        self.misses += len(missing)
        if missing:
            if shared:  # one row at a time: the entry depends on the row alone
                computed = [_trunk(decoder, j, input_ids, attention_mask, positions, lengths, [r])[0] for r in missing]
            else:
                computed = _trunk(decoder, j, input_ids, attention_mask, positions, lengths, missing)
            for r, value in zip(missing, computed):
                rows[r] = value
                self.put(keys[r], value, decoder, shared)
        first = rows[0]
        out = first.new_zeros((n, width, first.shape[-1]))
        for r, value in enumerate(rows):
            out[r, : value.shape[0]] = value.to(out.device)
        return out


def _device(decoder: Decoder) -> torch.device:
    return next(decoder.base.parameters()).device


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


@contextlib.contextmanager
def shared_trunk_dir(path: str | Path | None) -> Iterator[Path | None]:
    """Runs built inside the block (:func:`~abmll_pyro.train.setup.build`, also in processes spawned
    there) share the trunk folder ``path`` (made absolute; None: no shared folder); the previous
    ``$ABMLL_TRUNK_DIR`` is restored on exit."""
    previous = os.environ.get(TRUNK_DIR_ENV)
    folder = None if path is None else Path(path).expanduser().resolve()
    if folder is None:
        os.environ.pop(TRUNK_DIR_ENV, None)
    else:
        os.environ[TRUNK_DIR_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(TRUNK_DIR_ENV, None)
        else:
            os.environ[TRUNK_DIR_ENV] = previous


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
