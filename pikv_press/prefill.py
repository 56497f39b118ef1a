"""Prefill once, compress many times.

A prefill press compresses each layer's cache in a hook that runs after the layer's attention; it does not change the
hidden states that flow on, so the prefill computation is the same whatever the press. :class:`PrefillRecorder`
records, during one full-cache prefill, what the presses' hooks see (the attention input, rotary tables, attention
weights when the model returns them, and the full keys and values); :meth:`PrefillSnapshot.replay` then runs a
press's hooks on that record and returns the cache the press would have produced, exactly as
``with press(model): model.model(...)`` would, without running the model again.

Presses that run their own forward passes or hooks beyond the attention hook (KVzip, Finch, DecodingPress, ...) cannot
be replayed: :func:`can_replay` says which, and :meth:`PrefillSnapshot.replay` raises ``ValueError`` for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import BasePress, ComposedPress, DecodingPress, PrefillDecodingPress
from torch import nn
from transformers import DynamicCache

from pikv_press import compat
from pikv_press.moe import AttentionLayout, get_anatomy, language_model_of

# Presses whose hooks only need what a prefill records (their own `compress`/`score` on top of BasePress's hook).
_NOT_REPLAYABLE = (DecodingPress, PrefillDecodingPress)


def can_replay(press: BasePress) -> bool:
    """Whether ``press`` compresses only in attention hooks at prefill, so that a recorded prefill can replay it."""
    for inner in compat._inner_presses(press):
        if isinstance(inner, _NOT_REPLAYABLE):
            return False
        cls = type(inner)
        # a press with its own __call__ runs extra forward passes or hooks elsewhere (KVzip, Finch, ...)
        if cls.__call__ is not BasePress.__call__:
            return False
        if cls.forward_hook is not BasePress.forward_hook and not isinstance(inner, ComposedPress):
            return False
    return True


@dataclass
class _LayerRecord:
    kwargs: dict[str, Any]
    attentions: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class PrefillSnapshot:
    """One full-cache prefill, recorded per layer; replay presses on it with :meth:`replay`."""

    model: nn.Module
    layers: dict[int, _LayerRecord] = field(default_factory=dict)
    num_layers: int = 0

    def full_cache(self) -> DynamicCache:
        """A fresh copy of the uncompressed cache."""
        cache = DynamicCache()
        for idx in range(self.num_layers):
            record = self.layers[idx]
            cache.update(record.keys.clone(), record.values.clone(), idx)
        return cache

    def replay(self, press: BasePress | None) -> DynamicCache:
        """The cache ``press`` would have produced during the recorded prefill (a fresh copy; ``None``: full cache)."""
        cache = self.full_cache()
        language_model = language_model_of(self.model)
        for layer in language_model.layers:  # head-wise masks of a previous replay (AdaKV) must not leak
            if getattr(layer.self_attn, "masked_key_indices", None) is not None:
                layer.self_attn.masked_key_indices = None
        if press is None:
            return cache
        if not can_replay(press):
            raise ValueError(
                f"{type(press).__name__} runs its own forward passes or decoding-time hooks and cannot be replayed "
                "from a recorded prefill: run it with `with press(model): model.model(...)` instead."
            )
        compat.enable_ragged_cache_masks(self.model)  # as `press(model)` does: layers may hold different lengths
        anatomy = _moe_anatomy_or_none(self.model)
        if anatomy is not None:
            compat.check_press_supported(press, anatomy)
        press.post_init_from_model(self.model)
        compressible = anatomy.compressible_layers if anatomy is not None else range(self.num_layers)
        with torch.no_grad():
            for idx in compressible:
                record = self.layers[idx]
                module = language_model.layers[idx].self_attn
                kwargs = dict(record.kwargs, past_key_values=cache)
                output = (None, record.attentions)
                if anatomy is None:  # kvpress's own path for dense models
                    module.rotary_emb = language_model.rotary_emb
                    press.forward_hook(module, (), kwargs, output)
                else:
                    layout = AttentionLayout(module, anatomy.family, anatomy.config)
                    view = compat.AttentionView(module, layout, getattr(language_model, "rotary_emb", None))
                    compat._make_hook(press, layout, view)(module, (), kwargs, output)
        return cache


def _moe_anatomy_or_none(model: nn.Module):
    return compat._moe_anatomy_or_none(model)


class PrefillRecorder:
    """Context manager recording one prefill of ``model`` for :meth:`PrefillSnapshot.replay`.

    >>> with PrefillRecorder(model) as recorder:
    ...     model.model(input_ids=context_ids, past_key_values=DynamicCache())
    >>> cache = recorder.snapshot.replay(SnapKVPress(0.5))

    Memory: the attention input of every layer ``(batch, seq, hidden)`` and the full cache, plus the attention
    weights ``(batch, heads, seq, seq)`` of every layer when the model computes them (eager attention).
    """

    def __init__(self, model: nn.Module):
        get_anatomy(model)  # a clear error for unsupported models
        self.model = model
        self.snapshot = PrefillSnapshot(model=model)
        self._hooks: list = []

    def __enter__(self) -> PrefillRecorder:
        layers = language_model_of(self.model).layers
        self.snapshot.num_layers = len(layers)
        for layer in layers:
            self._hooks.append(layer.self_attn.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise ValueError("PrefillRecorder needs a forward pass with a cache: pass past_key_values=DynamicCache().")
        layer = cache.layers[module.layer_idx]
        if getattr(layer, "keys", None) is None or layer.keys.shape[-2] != kwargs["hidden_states"].shape[1]:
            raise ValueError("PrefillRecorder records one prefill from an empty cache; start from a new DynamicCache.")
        kept = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        self.snapshot.layers[module.layer_idx] = _LayerRecord(
            kwargs=kept, attentions=attentions, keys=layer.keys.detach().clone(), values=layer.values.detach().clone()
        )
