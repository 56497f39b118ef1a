"""``ExpertShardedCache``: each layer's KV cache split into shards keyed by routed expert, ragged, on their own devices.

>>> model = build_model("qwen3_moe", attn_implementation="pikv_sharded")   # or any MoE model of a known family
>>> cache = ExpertShardedCache(model)                                      # devices=["cuda:0", "cuda:1"] to spread
>>> model.generate(input_ids, past_key_values=cache, max_new_tokens=8)
>>> cache.shard_lengths(layer_idx)                                         # {expert: rows, ..., "local": rows}

What is implemented:

* **Layout.** Per layer, one shard per routed expert plus a *local* shard of attention-sink tokens (the first
  ``sink_tokens``) and recent tokens (the last ``recent_tokens``). A shard stores *rows*: one row is the key and value
  of one token for one key/value head, with its kv head, its insertion index (the order tokens entered the layer, which
  defines causality) and its routed expert. Shards have their own lengths and, per kv head, their own token counts
  (ragged: a press that keeps different tokens per head, or AdaKV's head-wise budgets, frees the bytes).
* **Routing.** New tokens (prefill and decoding) enter the local shard. The routing of layer ``l`` exists only after
  its MoE block, which runs after its attention; it is taken from a :class:`~pikv_press.moe.RoutingRecorder` (the
  experts each token was dispatched to, no second router pass) when the forward pass ends, and tokens that are
  neither sinks nor recent move to the shard of their top-1 expert at that layer. Dense layers use the routing of the
  nearest MoE layer (:func:`pikv_press.compat.routing_source_layer`). Sliding-window layers (GPT-OSS) keep their
  last ``sliding_window - 1`` tokens in the local shard and are never sharded.
* **Devices.** ``devices``: expert ``e``'s shards live on ``devices[e % len(devices)]`` (the local shard stays on the
  layer's device); ``devices="device_map"`` takes the devices of an accelerate ``device_map``; partial attention
  runs there and partial results are merged on the layer's device.
* **Presses.** Each layer implements the cache-layer interface (:func:`pikv_press.cache.layer_access`), so MoE-aware
  presses (``MoEAware(press)``, the routing presses) compress it: a write keeps exactly the rows a press kept (each
  row matched to the row it came from, so its insertion index and routing stay known) and frees the others. kvpress's
  head-wise masks (``module.masked_key_indices``, set by ``AdaKVPress``, ``CriticalAdaKVPress``, ``DMSPress``...) are
  applied as real removals when the forward pass ends, and cleared.
* **Attention.** Only ``attn_implementation="pikv_sharded"`` (:mod:`pikv_press.attention.sharded`) reads the shards;
  the cache refuses a model with another attention. ``read_top_k`` (routing-restricted reading): while it is set,
  every query (of a decoding step, or each token of a multi-token forward) reads only the shards of the
  ``read_top_k`` experts its layer's router predicts from the query token's attention input, plus the local shard
  (sinks, recent tokens and the tokens of the current forward); ``None`` reads every shard (exact attention). Set it
  after the context's prefill to restrict what comes after. ``bytes_read`` counts the KV bytes each forward read.

``layer.keys`` / ``layer.values`` read all rows in insertion order (a copy), and assigning them works as kvpress does
it: a prefix crops the layer (the pipeline trims answers), other rows (keys, then values) are kept as a press's.

Not implemented: batch size > 1 (``ValueError``); beam search and cache reordering; reading ``layer.keys`` of a layer
whose kv heads hold different numbers of tokens (after AdaKV: ``ValueError``). CUDA devices and real accelerate
device maps were never exercised (this machine has none).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from pikv_press.cache.layers import KVLayerAccess
from pikv_press.moe import RoutingRecorder, get_anatomy

SHARDED_ATTENTION = "pikv_sharded"
"""The ``attn_implementation`` that reads an :class:`ExpertShardedCache`."""
LAYER_TAG = "_pikv_sharded_layer"
"""Attribute of the key tensor a sharded layer's ``update`` returns, pointing back to the layer."""
LOCAL = "local"


# -- rows --------------------------------------------------------------------------------------------------------

class _Prefix:
    """``layer.keys[:, :, :n]`` of a ragged layer: assigning it back crops the layer to its first ``n`` tokens."""

    def __init__(self, length: int):
        self.length = length


class _RaggedView:
    """What ``keys`` / ``values`` return for a layer whose kv heads hold different numbers of tokens (after head-wise
    eviction): only kvpress's pipeline idiom ``layer.keys = layer.keys[:, :, :n]`` (trimming an answer) works on it;
    anything else raises the ``ValueError`` that says why."""

    def __init__(self, layer):
        self._layer = layer

    def _refuse(self):
        self._layer._dense_order()  # raises the explanation
        raise ValueError("This layer is no longer ragged: read its keys again.")

    def __getitem__(self, index):
        if (isinstance(index, tuple) and len(index) == 3 and index[0] == slice(None) and index[1] == slice(None)
                and isinstance(index[2], slice) and index[2].start in (None, 0) and index[2].step in (None, 1)
                and isinstance(index[2].stop, int)):
            return _Prefix(index[2].stop)
        self._refuse()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()

class Rows:
    """Rows of one shard: ``keys`` (n, key_dim), ``values`` (n, value_dim), ``heads`` (n,) int32 kv head,
    ``index`` (n,) int64 insertion index, ``expert`` (n,) int32 routed expert (-1: not known yet)."""

    __slots__ = ("keys", "values", "heads", "index", "expert")

    def __init__(self, keys, values, heads, index, expert):
        self.keys, self.values, self.heads, self.index, self.expert = keys, values, heads, index, expert

    @classmethod
    def empty(cls, key_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device) -> Rows:
        def ints(dt):
            return torch.zeros(0, dtype=dt, device=device)

        return cls(torch.zeros(0, key_dim, dtype=dtype, device=device),
                   torch.zeros(0, value_dim, dtype=dtype, device=device), ints(torch.int32), ints(torch.int64),
                   ints(torch.int32))

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> Rows:
        """Rows of ``keys`` (heads, seq, key_dim), ``values`` (heads, seq, value_dim), tokens numbered ``index``."""
        heads, seq = keys.shape[:2]
        device = keys.device
        head_ids = torch.arange(heads, dtype=torch.int32, device=device).repeat_interleave(seq)
        return cls(keys.reshape(heads * seq, -1), values.reshape(heads * seq, -1), head_ids,
                   index.to(device=device, dtype=torch.int64).repeat(heads),
                   torch.full((heads * seq,), -1, dtype=torch.int32, device=device))

    @property
    def n(self) -> int:
        return self.keys.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.heads, self.index, self.expert

    def select(self, which: torch.Tensor) -> Rows:
        """Rows at boolean mask or integer indices ``which`` (copies)."""
        which = which.to(self.keys.device)
        return Rows(*(t[which] for t in self.tensors()))

    def to(self, device: torch.device) -> Rows:
        return Rows(*(t.to(device) for t in self.tensors()))

    def kv_nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def cat(parts: Sequence[Rows], device: torch.device) -> Rows:
        parts = [p.to(device) for p in parts]
        return Rows(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in parts), strict=True)))


def _row_hash(rows_k: torch.Tensor, rows_v: torch.Tensor, coeff_k: torch.Tensor, coeff_v: torch.Tensor):
    """An exact, order-independent integer fingerprint of each row's bits (identical rows hash identically)."""

    def bits(x: torch.Tensor) -> torch.Tensor:
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.contiguous().view(width).to(torch.int64)

    return (bits(rows_k) * coeff_k).sum(-1) + (bits(rows_v) * coeff_v).sum(-1)


# -- one layer ---------------------------------------------------------------------------------------------------
class ExpertShardedLayer(CacheLayerMixin, KVLayerAccess):
    """One layer of an :class:`ExpertShardedCache` (see the module docstring); it implements the cache-layer
    interface itself, so :func:`~pikv_press.cache.layer_access` returns it as is."""

    is_compileable = False

    def __init__(self, layer_idx: int, num_experts: int, expert_devices: Sequence[torch.device] | None,
                 sliding_window: int | None, sink_tokens: int, recent_tokens: int, rank: int = 0,
                 world_size: int = 1, group=None):
        super().__init__()
        self.rank, self.world_size, self.group = rank, world_size, group
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.expert_devices = list(expert_devices) if expert_devices else None
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.local: Rows | None = None
        self.shards: list[Rows | None] = [None] * num_experts
        self.length = 0  # tokens as presses and positions see them (a press's write sets it)
        self.next_index = 0  # insertion index of the next token
        self.query_index: torch.Tensor | None = None  # insertion indices of the tokens of the current forward
        self.forward_start = 0
        self.unconsumed = False  # an update whose keys no pikv_sharded attention has read
        self.query_experts: torch.Tensor | None = None  # (q, k) predicted experts for routing-restricted reads
        self.bytes_read = 0
        self.attention_seconds = 0.0  # wall time of the sharded attention's shard reads and partials

    # -- transformers' layer interface ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_heads, self.key_dim, self.value_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.local = Rows.empty(self.key_dim, self.value_dim, self.dtype, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError(
                f"ExpertShardedCache holds one sequence (batch size 1); got a batch of {key_states.shape[0]}. Run "
                "sequences one at a time, or use a DynamicCache for batched generation."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        seq = key_states.shape[-2]
        if self.sliding_window is not None and self.local.n:  # keep what a query of this forward can still see
            self.local = self.local.select(self.local.index >= self.next_index - (self.sliding_window - 1))
        self.forward_start = self.next_index
        self.query_index = torch.arange(self.next_index, self.next_index + seq, device=self.device)
        new = Rows.from_dense(key_states[0], value_states[0], self.query_index)
        self.local = Rows.cat([self.local, new], self.device)
        self.next_index += seq
        self.length += seq
        self.unconsumed = True
        keys, values = key_states.view(key_states.shape), value_states.view(value_states.shape)
        setattr(keys, LAYER_TAG, self)
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.length + cache_position.shape[0], 0  # the sharded attention builds its own masks

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.num_experts, self.expert_devices, self.sliding_window, self.sink_tokens,
                      self.recent_tokens, self.rank, self.world_size, self.group)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("ExpertShardedCache does not support beam search (batch size 1 only).")

    def crop(self, max_length: int) -> None:
        """Forget the tokens that came after the first ``max_length`` (as :meth:`get_seq_length` counts them): what
        was appended since the layer held ``max_length`` tokens (an answer, to be trimmed off)."""
        if max_length < 0:
            max_length = self.length + max_length
        if max_length >= self.length or not self.is_initialized:
            return
        appended = self.length - max_length
        if appended > self.next_index:
            raise ValueError(f"Cannot crop layer {self.layer_idx} to {max_length} tokens: a press shortened it "
                             "after those tokens came.")
        cut = self.next_index - appended
        keep = [(e, rows.select(rows.index < cut)) for e, rows in self.all_shards()]
        self.local = next((rows for e, rows in keep if e == LOCAL), self.local)
        self.shards = [None] * self.num_experts
        for e, rows in keep:
            if e != LOCAL:
                self.shards[e] = rows
        self.next_index, self.length = cut, max_length

    # -- keys / values as attributes (kvpress reads and assigns ``layer.keys`` and ``layer.values``) ---------------
    @property
    def keys(self) -> torch.Tensor | None:
        """All keys ``(1, kv_heads, seq, key_dim)`` in insertion order (a copy; when the kv heads hold different
        numbers of tokens, a view on which only ``[:, :, :n]`` works and anything else raises ``ValueError``).
        Assigning a prefix of it crops the layer (kvpress's pipeline trims answers so);
        assigning other rows, then ``values``, keeps those rows (what a kvpress press does after scoring)."""
        if not self.is_initialized:
            return None
        return _RaggedView(self) if self._ragged() else self.read()[0]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is None or not self.is_initialized:
            return  # CacheLayerMixin.__init__
        if isinstance(value, _Prefix):
            self.crop(value.length)
            return
        if not self._crop_to(value, 0):
            self.__dict__["_pending_keys"] = value

    @property
    def values(self) -> torch.Tensor | None:
        """All values, as :attr:`keys`."""
        if not self.is_initialized:
            return None
        return _RaggedView(self) if self._ragged() else self.read()[1]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is None or not self.is_initialized:
            return
        if isinstance(value, _Prefix):
            self.crop(value.length)
            return
        pending = self.__dict__.pop("_pending_keys", None)
        if pending is not None:
            self.write(pending, value)
        elif not self._crop_to(value, 1):
            raise ValueError("Assigning values to an ExpertShardedCache layer keeps rows it holds: assign the kept "
                             "keys first, or write both through pikv_press.cache.layer_access(layer).write.")

    def _crop_to(self, tensor: torch.Tensor, which: int) -> bool:
        """Whether ``tensor`` is a prefix (in insertion order) of the layer's keys (0) or values (1); crops if so."""
        seq = tensor.shape[-2]
        if seq > self.length:
            return False
        current = self.read()[which]
        if current.shape[-2] != self.length or not torch.equal(current[..., :seq, :], tensor.to(current.device)):
            return False
        self.crop(seq)
        return True

    # -- shards ----------------------------------------------------------------------------------------------------
    def expert_device(self, expert: int) -> torch.device:
        return self.expert_devices[expert % len(self.expert_devices)] if self.expert_devices else self.device

    def all_shards(self) -> list[tuple[int | str, Rows]]:
        """``(expert or "local", rows)`` of every non-empty shard, local first."""
        out: list[tuple[int | str, Rows]] = [] if self.local is None else [(LOCAL, self.local)]
        out += [(e, s) for e, s in enumerate(self.shards) if s is not None and s.n]
        return out

    def _all_rows(self) -> Rows:
        return Rows.cat([rows for _, rows in self.all_shards()], self.device)

    def _place(self, rows: Rows) -> None:
        """Put ``rows`` where they belong: their expert's shard when routed and neither sink nor recent, else local."""
        stay = (rows.expert < 0) | (rows.index < self.sink_tokens) | (rows.index >= self.next_index -
                                                                      self.recent_tokens)
        if self.sliding_window is not None:
            stay = torch.ones_like(stay)
        self.local = Rows.cat([self.local, rows.select(stay)], self.device)
        moving = rows.select(~stay)
        if not moving.n:
            return
        self.shards = list(self.shards)  # a new list: a saved state (pikv_press.answer.save_cache) keeps the old one
        for expert in torch.unique(moving.expert).tolist():
            if expert % self.world_size != self.rank:
                continue  # another rank holds this expert's shard (it moves the same rows there)
            part = moving.select(moving.expert == expert)
            device = self.expert_device(expert)
            current = self.shards[expert]
            self.shards[expert] = part.to(device) if current is None else Rows.cat([current, part], device)

    def assign_routing(self, top1: torch.Tensor) -> None:
        """Routed expert of the tokens of the last forward (``top1`` (tokens,)), then move settled tokens out of the
        local shard."""
        if self.local is None:
            return
        fresh = self.local.index >= self.forward_start
        if int(top1.shape[0]) != self.next_index - self.forward_start:
            raise ValueError(f"layer {self.layer_idx}: {top1.shape[0]} routed tokens for "
                             f"{self.next_index - self.forward_start} cached ones (batch size 1 only).")
        offsets = (self.local.index[fresh] - self.forward_start).to(top1.device)
        self.local.expert[fresh] = top1[offsets].to(device=self.device, dtype=torch.int32)
        local, self.local = self.local, Rows.empty(self.key_dim, self.value_dim, self.dtype, self.device)
        self._place(local)

    # -- reading and writing (cache-layer interface) -------------------------------------------------------------
    def head_counts(self) -> torch.Tensor:
        """Rows per kv head, (kv_heads,) int64."""
        if not self.is_initialized:
            return torch.zeros(0, dtype=torch.int64)
        counts = torch.zeros(self.kv_heads, dtype=torch.int64)
        for _, rows in self.all_shards():
            counts += torch.bincount(rows.heads.long().cpu(), minlength=self.kv_heads)
        return counts

    def _ragged(self) -> bool:
        counts = self.head_counts()
        return bool(counts.numel()) and bool((counts != counts[0]).any())

    def _dense_order(self) -> tuple[Rows, torch.Tensor]:
        """All rows sorted by (head, insertion index) and the count per head; ``ValueError`` when heads differ."""
        rows = self._all_rows()
        order = torch.argsort(rows.heads.long() * (self.next_index + 1) + rows.index)
        rows = rows.select(order)
        counts = torch.bincount(rows.heads.long(), minlength=self.kv_heads)
        if rows.n and bool((counts != counts[0]).any()):
            raise ValueError(
                f"Layer {self.layer_idx} holds different numbers of tokens per kv head ({counts.tolist()}, after "
                "head-wise eviction): it cannot be read as one (batch, kv_heads, seq, dim) tensor. Read its shards "
                "(ExpertShardedCache.shards_of) instead."
            )
        return rows, counts

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            raise ValueError("This cache layer is empty: run a forward pass first.")
        rows, _ = self._dense_order()
        seq = rows.n // self.kv_heads
        return (rows.keys.view(1, self.kv_heads, seq, self.key_dim),
                rows.values.view(1, self.kv_heads, seq, self.value_dim))

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the rows of ``keys``/``values`` (batch 1, kv_heads, seq, dim): each must be a row the layer holds
        (presses keep rows, in any order, per head); the others are freed."""
        self._check_whole("write (a press)")
        if keys.shape[0] != 1 or keys.shape[1] != self.kv_heads:
            raise ValueError(f"write expects keys (1, {self.kv_heads}, seq, dim); got {tuple(keys.shape)}.")
        rows, counts = self._dense_order()
        seq = int(counts[0]) if rows.n else 0
        kept = keys.shape[2]
        generator = torch.Generator().manual_seed(0)
        coeff_k = torch.randint(1, 2**31, (self.key_dim,), generator=generator, dtype=torch.int64) * 2 + 1
        coeff_v = torch.randint(1, 2**31, (self.value_dim,), generator=generator, dtype=torch.int64) * 2 + 1
        old = _row_hash(rows.keys.cpu(), rows.values.cpu(), coeff_k, coeff_v).view(self.kv_heads, seq)
        new = _row_hash(keys[0].reshape(-1, self.key_dim).to("cpu", self.dtype),
                        values[0].reshape(-1, self.value_dim).to("cpu", self.dtype), coeff_k, coeff_v)
        new = new.view(self.kv_heads, kept)
        sorted_old, order = old.sort(dim=-1)
        pos = torch.searchsorted(sorted_old, new).clamp(max=max(seq - 1, 0))
        source = order.gather(-1, pos) if seq else pos
        flat = (source + torch.arange(self.kv_heads).view(-1, 1) * seq).flatten()
        chosen = rows.select(flat) if seq else rows
        same = (seq > 0 and torch.equal(chosen.keys.cpu(), keys[0].reshape(-1, self.key_dim).to("cpu", self.dtype))
                and torch.equal(chosen.values.cpu(), values[0].reshape(-1, self.value_dim).to("cpu", self.dtype)))
        if not same and kept:
            raise ValueError(
                "ExpertShardedCache stores only rows it already holds: this press wrote keys or values that are not "
                "rows of the layer (it modified them). Use the press with a DynamicCache."
            )
        if kept and bool((flat.view(self.kv_heads, kept).sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise ValueError("The press wrote the same row twice in one head; ExpertShardedCache keeps each row once.")
        self._replace(chosen if kept else Rows.empty(self.key_dim, self.value_dim, self.dtype, self.device))
        self.length = kept

    def seq_length(self) -> int:
        return self.length

    def storage_tensors(self) -> Iterator[torch.Tensor]:
        for _, rows in self.all_shards():
            yield from rows.tensors()

    def remove(self, head_idx: torch.Tensor, seq_idx: torch.Tensor) -> None:
        """Free the rows at ``(head_idx, seq_idx)`` of :meth:`read`'s order (kvpress's ``masked_key_indices``)."""
        self._check_whole("remove (a head-wise press)")
        rows, counts = self._dense_order()
        seq = int(counts[0]) if rows.n else 0
        drop = torch.zeros(rows.n, dtype=torch.bool)
        drop[(head_idx.long().cpu() * seq + seq_idx.long().cpu())] = True
        self._replace(rows.select(~drop.to(rows.keys.device)))

    def _check_whole(self, what: str) -> None:
        if self.world_size > 1:
            raise ValueError(f"{what} needs every row of the layer, and this rank holds only its experts' shards: "
                             "presses are not supported with distributed=True; compress before distributing.")

    def _replace(self, rows: Rows) -> None:
        self.local = Rows.empty(self.key_dim, self.value_dim, self.dtype, self.device)
        self.shards = [None] * self.num_experts
        self._place(rows)

    # -- attention -------------------------------------------------------------------------------------------------
    def selected_shards(self) -> list[tuple[int | str, Rows, torch.Tensor | None]]:
        """``(shard, rows, readers)`` of the shards the current queries read: every shard (``readers`` None), or
        under routing-restricted reading the local shard (read by every query) and each shard of an expert that some
        query's predicted experts (``query_experts`` (q_len, k)) include, with ``readers`` (q_len,) bool: the queries
        that read it."""
        shards = self.all_shards()
        if self.rank != 0:  # the local shard is read once, by rank 0
            shards = [(e, rows) for e, rows in shards if e != LOCAL]
        if self.query_experts is None:
            return [(e, rows, None) for e, rows in shards]
        if self.query_experts.shape[0] == 1:  # one query (decoding): its experts' shards, read whole
            wanted = set(self.query_experts[0].tolist())
            return [(e, rows, None) for e, rows in shards if e == LOCAL or e in wanted]
        selected = []
        for expert, rows in shards:
            if expert == LOCAL:
                selected.append((expert, rows, None))
                continue
            readers = (self.query_experts == expert).any(dim=-1)
            if bool(readers.any()):
                selected.append((expert, rows, None if bool(readers.all()) else readers))
        return selected


# -- the cache ---------------------------------------------------------------------------------------------------
def parse_devices(devices: Sequence[str | torch.device] | None) -> list[torch.device] | None:
    """``devices`` as ``torch.device``s; ``ValueError`` for an unknown or unavailable device."""
    if devices is None:
        return None
    if isinstance(devices, (str, torch.device)) or len(devices) == 0:
        raise ValueError(f"devices must be a non-empty list of devices, e.g. ['cuda:0', 'cuda:1']; got {devices!r}.")
    parsed = []
    for device in devices:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"Unknown device {device!r} in devices: {error}") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"Device {device!r} is not available here (CUDA devices: "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}).")
        if dev.type not in ("cpu", "cuda", "meta", "mps", "xpu"):
            raise ValueError(f"Device type {dev.type!r} is not supported for KV shards (cpu, cuda, meta, mps, xpu).")
        parsed.append(dev)
    return parsed


def devices_of_device_map(model: nn.Module) -> list[torch.device]:
    """The distinct devices of an accelerate ``device_map`` (``model.hf_device_map``), in order of first use; integers
    are CUDA indices, ``"disk"`` entries are skipped."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        raise ValueError("devices='device_map' needs a model loaded with device_map=... (model.hf_device_map is "
                         "missing); pass an explicit list of devices instead.")
    found: list[torch.device] = []
    for value in device_map.values():
        if value == "disk":
            continue
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
        if device not in found:
            found.append(device)
    if not found:
        raise ValueError(f"model.hf_device_map names no device for tensors: {device_map}.")
    return found


def _routing_source(anatomy, layer_idx: int) -> int:
    from pikv_press.compat import routing_source_layer  # compat imports kvpress: only when a cache is built

    return routing_source_layer(anatomy, layer_idx)


def predicted_experts(anatomy, layer_idx: int, hidden_states: torch.Tensor, k: int) -> torch.Tensor:
    """``(tokens, k)`` experts layer ``layer_idx``'s router predicts for ``hidden_states`` (the attention input): the
    experts it would select, best first, then (for ``k`` above the model's top-k) the others by router probability."""
    routing = anatomy.route(layer_idx, hidden_states)
    ids = routing.topk_ids
    if k <= ids.shape[1]:
        return ids[:, :k]
    chosen = torch.zeros_like(routing.probs, dtype=torch.bool).scatter_(1, ids, True)
    rest = routing.probs.masked_fill(chosen, float("-inf")).topk(k - ids.shape[1], dim=-1).indices
    return torch.cat([ids, rest], dim=-1)


class _ModelHooks:
    """Hooks an :class:`ExpertShardedCache` keeps on its model while it lives: the routing recorder, the forward
    hooks of the language model (route the tokens of a forward that used this cache) and, for routing-restricted
    decoding, attention pre-hooks predicting each query's experts. Removed by :meth:`ExpertShardedCache.close` or when
    the cache is garbage-collected."""

    def __init__(self, cache: ExpertShardedCache, model: nn.Module, anatomy):
        self.cache_ref = weakref.ref(cache)
        self.anatomy = anatomy
        self.recorder = RoutingRecorder(model)
        self.handles: list = []
        self.active = False
        self.recorder.__enter__()
        try:
            lm = anatomy.language_model
            self.handles.append(lm.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(lm.register_forward_hook(self._post, with_kwargs=True))
            for idx in range(anatomy.num_layers):
                self.handles.append(anatomy.attention(idx).register_forward_pre_hook(self._predict(idx),
                                                                                     with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.recorder.__exit__()

    def _pre(self, module, args, kwargs):
        cache = self.cache_ref()
        self.active = cache is not None and kwargs.get("past_key_values") is cache
        self.recorder.reset()
        if self.active:
            for layer in cache.layers:  # a forward that raised may have left flags behind
                layer.unconsumed = False
                layer.query_experts = None
            if all(not layer.is_initialized or layer.get_seq_length() == 0 for layer in cache.layers):
                # a prefill clears head-wise masks left by an earlier forward: after_forward would otherwise remove
                # their rows from this new context
                from pikv_press.attention.headwise import clear_masks  # the attention package imports this module

                clear_masks(self.anatomy.attention(idx) for idx in range(self.anatomy.num_layers))

    def _predict(self, layer_idx: int):
        def hook(module, args, kwargs):
            cache = self.cache_ref()
            if not self.active or cache is None or layer_idx >= len(cache.layers):
                return
            layer = cache.layers[layer_idx]
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if cache.read_top_k is None or hidden is None or layer.sliding_window is not None:
                layer.query_experts = None
                return
            layer.query_experts = predicted_experts(self.anatomy, cache.routing_source[layer_idx], hidden,
                                                    cache.read_top_k)

        return hook

    def _post(self, module, args, kwargs, output):
        cache = self.cache_ref()
        if not self.active or cache is None:
            return
        self.active = False
        try:
            cache.after_forward(self.anatomy, self.recorder)
        finally:
            self.recorder.reset()  # the routing of this forward is in the cache now: free the record


class ExpertShardedCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`ExpertShardedLayer` (see the module docstring).

    Parameters
    ----------
    model : an MoE model of a known family, loaded with ``attn_implementation="pikv_sharded"``.
    devices : expert ``e``'s shards live on ``devices[e % len(devices)]``; ``None``: the layer's device;
        ``"device_map"``: the distinct devices of the model's accelerate ``hf_device_map``.
    sink_tokens : the first tokens kept in the local shard (attention sinks), >= 0.
    recent_tokens : the most recent tokens kept in the local shard, >= 0.
    distributed : spread expert shards over the ranks of ``group`` (torch.distributed, initialised): expert ``e`` on
        rank ``e % world_size``; see :mod:`pikv_press.attention.distributed`. Presses are refused then.
    group : the process group (default: the world).
    read_top_k : routing-restricted decoding: a decoding query reads the local shard and the shards of its
        ``read_top_k`` predicted experts only (``None``: every shard, exact attention). Can be changed between steps.
    """

    def __init__(self, model: nn.Module, devices: Sequence[str | torch.device] | None = None, sink_tokens: int = 4,
                 recent_tokens: int = 16, read_top_k: int | None = None, distributed: bool = False, group=None):
        anatomy = get_anatomy(model)
        if not anatomy.has_router:
            raise ValueError(f"ExpertShardedCache shards tokens by routed expert and needs an MoE model with a "
                             f"routing record; {anatomy.describe()}. Use a DynamicCache for dense models.")
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation != SHARDED_ATTENTION:
            raise ValueError(
                f"ExpertShardedCache is read by the sharded attention only; this model uses {implementation!r}. Load "
                f"it with attn_implementation={SHARDED_ATTENTION!r} or call model.set_attn_implementation("
                f"{SHARDED_ATTENTION!r}), after pikv_press.attention.register_sharded_attention()."
            )
        if sink_tokens < 0 or recent_tokens < 0:
            raise ValueError(f"sink_tokens and recent_tokens must be >= 0; got {sink_tokens}, {recent_tokens}.")
        if isinstance(devices, str) and devices == "device_map":
            devices = devices_of_device_map(model)
        self.expert_devices = parse_devices(devices)
        self.num_experts = anatomy.num_experts
        self._read_top_k = None
        self.read_top_k = read_top_k
        rank, world_size = 0, 1
        if distributed:
            if not torch.distributed.is_available() or not torch.distributed.is_initialized():
                raise ValueError("distributed=True needs torch.distributed initialised first "
                                 "(torch.distributed.init_process_group, e.g. under torchrun).")
            rank, world_size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        self.rank, self.world_size = rank, world_size
        window = getattr(anatomy.config, "sliding_window", None)
        layers = [
            ExpertShardedLayer(idx, self.num_experts, self.expert_devices,
                               window if idx in anatomy.sliding_layers else None, sink_tokens, recent_tokens,
                               rank, world_size, group)
            for idx in range(anatomy.num_layers)
        ]
        super().__init__(layers=layers)
        self.routing_source = {idx: _routing_source(anatomy, idx) for idx in range(anatomy.num_layers)}
        self._hooks = _ModelHooks(self, model, anatomy)
        self._finalizer = weakref.finalize(self, self._hooks.remove)

    @property
    def read_top_k(self) -> int | None:
        return self._read_top_k

    @read_top_k.setter
    def read_top_k(self, value: int | None) -> None:
        if value is not None and not 1 <= int(value) <= self.num_experts:
            raise ValueError(f"read_top_k must be None or in [1, {self.num_experts}]; got {value}.")
        self._read_top_k = None if value is None else int(value)

    def close(self) -> None:
        """Remove the hooks this cache keeps on its model (also done when the cache is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> ExpertShardedCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def after_forward(self, anatomy, recorder: RoutingRecorder) -> None:
        """At the end of a forward pass that used this cache: apply kvpress's head-wise masks as removals, then route
        the new tokens and move them to their shards."""
        stale = [idx for idx, layer in enumerate(self.layers) if layer.unconsumed]
        if stale:
            raise ValueError(
                f"Layers {stale} of this ExpertShardedCache were updated but never read by the sharded attention: "
                f"load the model with attn_implementation={SHARDED_ATTENTION!r} (model.set_attn_implementation)."
            )
        for idx, layer in enumerate(self.layers):
            layer.query_experts = None
            if not layer.is_initialized:
                continue
            module = anatomy.attention(idx)
            masked = getattr(module, "masked_key_indices", None)
            if masked is not None:
                _, head_idx, seq_idx = masked
                layer.remove(head_idx, seq_idx)
                module.masked_key_indices = None
            routing = recorder.routing(self.routing_source[idx])
            layer.assign_routing(routing.top1)

    # -- inspection ------------------------------------------------------------------------------------------------
    def shard_lengths(self, layer_idx: int) -> dict[int | str, int]:
        """Tokens (rows / kv heads) in each non-empty shard of layer ``layer_idx``: ``{expert: n, "local": n}``."""
        layer = self.layers[layer_idx]
        return {e: rows.n / layer.kv_heads for e, rows in layer.all_shards()}

    def shards_of(self, layer_idx: int) -> dict[int | str, Rows]:
        """The :class:`Rows` of every non-empty shard of layer ``layer_idx`` (read-only use)."""
        return dict(self.layers[layer_idx].all_shards())

    @property
    def bytes_read(self) -> int:
        """KV bytes (keys and values) the sharded attention read from this cache since the counter was reset."""
        return sum(layer.bytes_read for layer in self.layers)

    @property
    def attention_seconds(self) -> float:
        """Wall seconds the sharded attention spent reading shards and computing partials (all layers)."""
        return sum(layer.attention_seconds for layer in self.layers)

    def reset_bytes_read(self) -> None:
        """Reset :attr:`bytes_read` and :attr:`attention_seconds`."""
        for layer in self.layers:
            layer.bytes_read = 0
            layer.attention_seconds = 0.0
