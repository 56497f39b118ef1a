"""``KVzipSurrogatePress``: KVzip's scores predicted from the attention input by a fitted linear model (KVzap)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kvpress import ScorerPress
from kvpress.presses.kvzap_press import KVzapModel
from torch import nn

from pikv_press.attention import headwise
from pikv_press.cache.sharded import SHARDED_ATTENTION, ExpertShardedLayer
from pikv_press.compat import _MoEAwareBase
from pikv_press.presses.base import check_batch_size_one, check_ratio

SURROGATES = Path(__file__).resolve().parents[1] / "surrogates"
ALLOCATIONS = ("head", "layer", "global")


def shipped_surrogate(model: nn.Module) -> Path | None:
    """The folder of the surrogate shipped for ``model`` (``pikv_press/surrogates/<last part of its
    name_or_path>``), or ``None``."""
    name = Path(str(getattr(model.config, "name_or_path", "") or "")).name
    folder = SURROGATES / name
    return folder if name and (folder / "config.json").exists() else None


@functools.lru_cache(maxsize=8)
def _load(folder: str, modified: float) -> KVzapModel:
    """A surrogate read from ``folder`` once per modification time (presses are rebuilt for every run)."""
    return KVzapModel.from_pretrained(folder).eval()


@dataclass
class KVzipSurrogatePress(_MoEAwareBase, ScorerPress):
    """KVzip's scores at the price of one small matrix product per layer: the KVzap recipe (Jegou and Jeblick 2026,
    arXiv 2601.07891) with a linear surrogate fitted for the model (:mod:`pikv_press.surrogate`,
    ``python -m evaluation.fit_kvzip_surrogate``). Each layer's surrogate reads the hidden state that enters the
    attention and predicts, per kv head, the logarithm of the score that KVzip's context reconstruction would give the
    token. The first ``n_sink`` tokens (KVzip's sinks) and the last ``window_size`` (KVzap's sliding window, as
    kvpress's ``DMSPress``) are always kept. How the budget is spent (``allocation``):

    * ``"global"``: KVzip's own allocation. The predicted scores of every layer and kv head are ranked together once
      the prefill has run, and the lowest ``compression_ratio`` of all (layer, head, token) entries are evicted, so
      layers and heads keep different shares, as ``KVzipPress`` does with its reconstruction scores, decided when
      the prefill is over. A ``DynamicCache`` holds the same number of tokens in every head of a layer: each layer
      is cut to what its widest head keeps, and in the other heads the rows beyond their own share stay in memory
      as exact head-wise masks in SDPA attention (:mod:`pikv_press.attention.headwise`; KVzip in kvpress masks
      every evicted row and frees none). An :class:`~pikv_press.cache.ExpertShardedCache` (attention
      ``"pikv_sharded"``) holds a different number of rows per head, and there every evicted row is freed.
    * ``"layer"``: KVzip's allocation across layers, with the bytes freed. The same global ranking decides how many
      entries each layer gives up; each layer then evicts that many divided by its kv heads from every head (its
      lowest-predicted tokens in that head), rows freed in any cache, once the prefill is over. In all,
      ``int(layers * seq * compression_ratio)`` tokens per kv head are removed, split across layers by largest
      remainder. The full cache of every layer is held until the prefill ends, as in ``"global"``.
    * ``"head"``: every head of every layer keeps its best-predicted ``1 - compression_ratio`` of the tokens
      (kvpress's ``ScorerPress``), so the keys and values are physically smaller in any cache.

    MoE-correct by construction (:mod:`pikv_press.compat`).

    **Measured** (embedded model ``smollm2-moe-ed1da41ac4``, teacher-forced, paired 95% intervals; README,
    "Routing-aware presses"): the shipped surrogate (held-out R² 0.58 on news text) on the 130 RULER-4k headline
    contexts scores 19.3 / 19.1 / 15.6 at 0.25 / 0.5 / 0.75 against TOVA's (``PiKVPress``) 20.3 / 18.6 / 11.2, a tie
    (-1.0 [-4.5, +2.4] / +0.5 [-3.3, +4.3] / +4.5 [-0.9, +9.7]), and below KVzip's 22.0 / 22.8 / 19.3, at 2% of the
    prefill's time against KVzip's 474%. ``allocation="head"`` loses 7-12 points to TOVA, and ``"layer"`` hardly
    less (12.1 / 6.9 / 3.8: -7.2 / -12.2 / -11.8 against ``"global"``, intervals below 0): the shares of the heads
    inside a layer matter. In a ``DynamicCache`` the global allocation holds 88 / 68 / 40% of the full cache's rows
    at 0.25 / 0.5 / 0.75 (the widest head of each layer). On the needle grid it keeps 15/15 needles at 0.5 and
    10/15 at 0.75 (TOVA 1/15), and on RULER-1k at 0.5 (``make demo``) the full cache's 65.6.

    What differs from KVzap: a compression ratio instead of KVzap's score threshold; the targets are plain KVzip
    scores, not KVzip+; and the surrogate shipped for the embedded model was fitted on news articles (the Lee
    corpus), not on the text it is evaluated on (README, "Routing-aware presses").

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    surrogate : a kvpress ``KVzapModel`` (linear or MLP, one module per layer, one output per kv head), the folder
        of one, or ``None``: the surrogate shipped for the model (``pikv_press/surrogates/<model folder>``; a
        ``ValueError`` says how to fit one where there is none).
    window_size : the most recent context tokens, always kept.
    n_sink : the first context tokens, always kept.
    allocation : ``"global"`` (KVzip's ranking across layers and heads; each layer cut to its widest head, the
        rest masked head-wise), ``"layer"`` (the global ranking's share per layer, the same share in each of its
        heads, evicted rows freed) or ``"head"`` (the same share in every head of every layer, evicted rows freed).
    """

    compression_ratio: float = 0.0
    surrogate: KVzapModel | str | Path | None = None
    window_size: int = 128
    n_sink: int = 4
    allocation: str = "global"
    _resolved: KVzapModel | None = field(default=None, init=False, repr=False)
    _on_device: dict = field(default_factory=dict, init=False, repr=False)
    _table: dict = field(default_factory=dict, init=False, repr=False)
    _cache: object = field(default=None, init=False, repr=False)
    _begun: bool = field(default=False, init=False, repr=False)
    # its __call__ only adds begin_prefill / finish_prefill around the hooks, which a prefill replay runs too
    # (pikv_press.prefill)
    replays_with_finish_prefill = True

    def __post_init__(self):
        check_ratio(self, self.compression_ratio)
        for name in ("window_size", "n_sink"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"KVzipSurrogatePress: {name} must be an integer >= 0, got {value!r}.")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"KVzipSurrogatePress: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if self.surrogate is not None and not isinstance(self.surrogate, (KVzapModel, str, Path)):
            raise ValueError(f"KVzipSurrogatePress: surrogate must be a kvpress KVzapModel, the folder of one, or "
                             f"None, got {type(self.surrogate).__name__}.")

    def __setattr__(self, name, value):
        if name == "compression_ratio":
            check_ratio(self, value)
        if name == "surrogate":  # a new surrogate is read again at the next post_init_from_model
            super().__setattr__("_resolved", None)
            super().__setattr__("_on_device", {})
        super().__setattr__(name, value)

    def post_init_from_model(self, model: nn.Module) -> None:
        from pikv_press.surrogate import check_fits

        super().post_init_from_model(model)
        if self.allocation == "global":
            from pikv_press.compat import attention_implementation, moe_anatomy_for_press

            anatomy = moe_anatomy_for_press(model)
            implementation = attention_implementation(anatomy) if anatomy is not None else None
            if anatomy is not None and implementation not in ("sdpa", SHARDED_ATTENTION):
                raise ValueError(f"KVzipSurrogatePress(allocation='global') masks its evictions head-wise inside SDPA "
                                 f"attention (or removes them from an ExpertShardedCache, attention "
                                 f"{SHARDED_ATTENTION!r}); this model runs {implementation!r} attention: load it with "
                                 "attn_implementation='sdpa', or use allocation='layer' or 'head' (rows evicted, "
                                 "any attention).")
        if self._resolved is None:
            surrogate = self.surrogate
            if surrogate is None:
                surrogate = shipped_surrogate(model)
                if surrogate is None:
                    name = getattr(model.config, "name_or_path", "")
                    raise ValueError(f"KVzipSurrogatePress: no KVzip surrogate is shipped for {name!r}. Fit one with "
                                     "`python -m evaluation.fit_kvzip_surrogate --model <model>` and pass "
                                     "surrogate=<its folder>.")
            if not isinstance(surrogate, KVzapModel):
                config = Path(surrogate) / "config.json"
                if not config.exists():
                    raise ValueError(f"KVzipSurrogatePress: {surrogate} is not the folder of a KVzapModel (no "
                                     "config.json); save one with KVzapModel.save_pretrained(folder).")
                surrogate = _load(str(Path(surrogate).resolve()), config.stat().st_mtime)
            self._resolved = surrogate.eval()
            self._on_device = {}
        check_fits(self._resolved, model)

    def _module(self, layer_idx: int, device: torch.device) -> nn.Module:
        if self._resolved is None:
            raise ValueError("KVzipSurrogatePress has not seen the model: use it as `with press(model):` or through "
                             "the pipeline.")
        key = (layer_idx, device)
        if key not in self._on_device:  # fp32 copies, one per layer and device (the surrogate itself is not moved)
            self._on_device[key] = copy.deepcopy(self._resolved.layers[layer_idx]).to(device=device,
                                                                                     dtype=torch.float32)
        return self._on_device[key]

    def predicted_log_scores(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """The surrogate's predicted log KVzip scores ``(batch, kv_heads, seq)`` of one layer, in float32."""
        module = self._module(layer_idx, hidden_states.device)
        with torch.no_grad():
            return module(hidden_states.float()).transpose(1, 2)

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        """The MoE-aware hooks; with ``allocation="global"``, the evictions are decided when the prefill is over."""
        self.begin_prefill()
        try:
            with super().__call__(model):
                yield
                # inside the hooks' scope: a cache that "layer" leaves ragged keeps its mask fitting (compat)
                self.finish_prefill(model)
        finally:
            self._begun, self._table, self._cache = False, {}, None

    def begin_prefill(self) -> None:
        """Start collecting the scores of every layer (``with press(model):`` and a prefill replay call it)."""
        self._begun, self._table, self._cache = True, {}, None

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.allocation == "head" or self.compression_ratio == 0:
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)
        if not self._begun:
            raise ValueError(f"KVzipSurrogatePress(allocation={self.allocation!r}) decides its evictions once the "
                             "whole prefill is scored, so it runs as the outermost press (`with press(model):`, the "
                             "pipeline or a prefill replay), not inside another press such as ComposedPress: use "
                             "allocation='head' there.")
        layer_idx = int(module.layer_idx)
        self._table[layer_idx] = self.score(module, hidden_states, keys, values, attentions, kwargs)
        self._cache = kwargs["past_key_values"]  # the cache finish_prefill cuts
        return keys, values  # nothing evicted yet: finish_prefill ranks every layer's scores together

    def finish_prefill(self, model: nn.Module) -> None:
        """Rank the scores of every (layer, kv head, token) recorded during the prefill together (KVzip's
        ``compress_post`` allocation) and evict. ``"global"``: the lowest ``compression_ratio`` of all entries; an
        ``ExpertShardedCache`` layer removes them; any other layer is cut to the most tokens one of its heads keeps,
        each head holding its kept rows first and, where it keeps fewer, some of its evicted rows behind them, which
        are masked head-wise (exact in SDPA attention). ``"layer"``: as many tokens per head from each layer as the
        ranking takes from it, rows freed. Called on leaving ``with press(model):`` and at the end of a prefill
        replay."""
        table, cache, self._table, self._cache, self._begun = self._table, self._cache, {}, None, False
        if self.allocation == "head" or self.compression_ratio == 0 or not table:
            return
        layers = sorted(table)
        scores = torch.stack([table[i][0].float().cpu() for i in layers])  # (layers, kv_heads, seq)
        self._protect(scores, scores.max() + 1)  # above every layer's and head's score, as KVzip's sinks
        seq = scores.shape[-1]
        if self.allocation == "layer":
            evicted = self.layer_evictions(scores)
            for position, layer_idx in enumerate(layers):
                n_kept = seq - int(evicted[position])
                if n_kept < seq:  # as kvpress's ScorerPress: each head's best-scored tokens
                    _keep_rows(cache.layers[layer_idx], scores[position].topk(n_kept, dim=-1).indices)
            return
        from pikv_press.compat import moe_anatomy_for_press
        from pikv_press.moe.anatomy import get_anatomy

        anatomy = moe_anatomy_for_press(model) or get_anatomy(model)
        evict = _lowest(scores, int(scores.numel() * self.compression_ratio))
        for position, layer_idx in enumerate(layers):
            layer, gone = cache.layers[layer_idx], evict[position]
            if isinstance(layer, ExpertShardedLayer):  # ragged rows per head: the evicted ones are freed
                head_idx, seq_idx = gone.nonzero(as_tuple=True)
                layer.remove(head_idx, seq_idx)
                continue
            if getattr(model.config, "_attn_implementation", None) == SHARDED_ATTENTION:
                raise ValueError(f"KVzipSurrogatePress(allocation='global') under {SHARDED_ATTENTION!r} attention "
                                 "removes its evictions from an ExpertShardedCache; this cache is a "
                                 f"{type(layer).__name__}: use an ExpertShardedCache, or SDPA attention.")
            kept = seq - gone.sum(dim=-1)  # (heads,)
            width = int(kept.max())
            if width < seq:  # every head's kept rows first (in order), then evicted ones up to the widest head
                _keep_rows(layer, torch.argsort(gone.to(torch.int8), dim=-1, stable=True)[:, :width])
                gone = torch.arange(width)[None, :] >= kept[:, None]
            head_idx, seq_idx = gone.nonzero(as_tuple=True)
            module = anatomy.attention(layer_idx)
            module.masked_key_indices = (torch.zeros_like(head_idx), head_idx, seq_idx)
            headwise.mark(module)
            headwise.move_masks(module)

    def layer_evictions(self, scores: torch.Tensor) -> torch.Tensor:
        """``allocation="layer"``: the tokens each layer evicts from every kv head, ``(layers,)``, from the protected
        scores ``(layers, kv_heads, seq)``. The lowest ``int(layers * seq * compression_ratio) * kv_heads`` entries
        of all layers and heads are found as in ``"global"``; a layer's share of them, divided by its heads, is
        rounded by largest remainder (ties: the earlier layer), so the counts add up to exactly
        ``int(layers * seq * compression_ratio)``."""
        n_layers, heads, seq = scores.shape
        total = int(n_layers * seq * self.compression_ratio)
        share = _lowest(scores, total * heads).sum(dim=(1, 2)).double() / heads
        counts = share.floor().long()
        remainder = share - counts
        order = sorted(range(n_layers), key=lambda i: (-float(remainder[i]), i))
        for i in order[: total - int(counts.sum())]:
            counts[i] += 1
        return counts

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        check_batch_size_one(self, keys)
        scores = self.predicted_log_scores(int(module.layer_idx), hidden_states)
        if scores.shape[1] != keys.shape[1] or scores.shape[2] != keys.shape[2]:
            raise ValueError(f"KVzipSurrogatePress: the surrogate scores {scores.shape[1]} kv heads x "
                             f"{scores.shape[2]} tokens, the layer caches {keys.shape[1]} x {keys.shape[2]}: it was "
                             "fitted for another model, or the prefill is chunked (score the whole context at once).")
        return self._protect(scores, scores.amax(dim=-1, keepdim=True) + 1)

    def _protect(self, scores: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """``scores`` (..., seq) with the sinks and the window ranked above ``top`` (in place): sinks first, then the
        window, latest first, so that when the budget is smaller than the protected set the choice is
        deterministic."""
        seq = scores.shape[-1]
        sink, window = min(self.n_sink, seq), min(self.window_size, seq)
        if window:
            scores[..., seq - window:] = top + torch.arange(1, window + 1, device=scores.device, dtype=scores.dtype)
        if sink:
            scores[..., :sink] = top + window + 1 + torch.arange(sink, 0, -1, device=scores.device,
                                                                 dtype=scores.dtype)
        return scores


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """A boolean mask of the shape of ``scores``, true at its ``n`` lowest entries (over every layer and head)."""
    lowest = torch.zeros(scores.numel(), dtype=torch.bool)
    lowest[torch.topk(-scores.reshape(-1), n).indices] = True
    return lowest.view(scores.shape)


def _keep_rows(layer, index: torch.Tensor) -> None:
    """Keep, in every kv head ``h`` of a cache layer, the rows ``index[h]`` (``(kv_heads, n)`` token positions, in
    that order); the others are freed. Rows are whole tokens of one head, so the cache's own layout (partial RoPE,
    latent attention) needs no transform."""
    from pikv_press.cache.layers import layer_access

    access = layer_access(layer)
    keys, values = access.read()
    index = index.to(keys.device)[None, :, :, None]
    access.write(keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1])).contiguous(),
                 values.gather(2, index.expand(-1, -1, -1, values.shape[-1])).contiguous())
