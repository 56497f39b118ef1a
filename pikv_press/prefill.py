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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import BasePress, ComposedPress, DecodingPress, PrefillDecodingPress
from torch import nn
from transformers import Cache

from pikv_press import compat
from pikv_press.attention import headwise
from pikv_press.cache import layer_access, make_cache
from pikv_press.moe import ContextRouting, RoutingRecorder, get_anatomy, language_model_of

# Presses whose hooks only need what a prefill records (their own `compress`/`score` on top of BasePress's hook).
_NOT_REPLAYABLE = (DecodingPress, PrefillDecodingPress)


def can_replay(press: BasePress, model: nn.Module | None = None) -> bool:
    """Whether ``press`` compresses only in attention hooks at prefill, so that a recorded prefill can replay it.
    ``MoEAware(KVzipPress(...))`` replays too on an MoE ``model`` (its reconstruction runs on the record,
    :func:`pikv_press.kvzip.replay`)."""
    if compat.has_moe_correct_call(press):
        return model is not None and compat.moe_anatomy_for_press(model) is not None
    for inner in compat.inner_presses(press):
        if isinstance(inner, _NOT_REPLAYABLE):
            return False
        cls = type(inner)
        # a press with its own __call__ runs extra forward passes or hooks elsewhere (KVzip, Finch, ...)
        # (a press whose __call__ only adds steps around the hooks says so; replay runs begin_/finish_prefill)
        if cls.__call__ not in (BasePress.__call__, compat._ORIGINAL_CALL, compat._moe_aware_call) and not (
                getattr(cls, "replays_with_finish_prefill", False)):
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
    routing: dict[int, ContextRouting] = field(default_factory=dict)
    """Routing of the context tokens of every MoE layer (empty for dense models), for presses that read it."""
    input_ids: torch.Tensor | None = None
    """The context's token ids (``None`` for a prefill from ``inputs_embeds``), for presses that re-read it (KVzip)."""
    memo: dict = field(default_factory=dict)
    """What a press computed from this record that does not depend on its ratio (KVzip's scores), by its settings."""

    def full_cache(self, cache_factory: Callable[[], Cache] | None = None) -> Cache:
        """A fresh copy of the uncompressed cache, in a new cache from ``cache_factory`` (default a DynamicCache);
        each layer receives the recorded keys and values in one ``update``, as in the recorded prefill."""
        cache = cache_factory() if cache_factory is not None else make_cache("dynamic")
        for idx in range(self.num_layers):
            record = self.layers[idx]
            cache.update(record.keys.clone(), record.values.clone(), idx)
        return cache

    def replay(self, press: BasePress | None, cache_factory: Callable[[], Cache] | None = None) -> Cache:
        """The cache ``press`` would have produced during the recorded prefill (a fresh copy; ``None``: full cache).

        The same hooks run as under ``with press(model):`` (MoE-aware for :func:`pikv_press.MoEAware` presses and
        pikv-press presses, kvpress's own otherwise), on a new cache from ``cache_factory`` (for example
        ``lambda: make_cache("quantized-int4", model.config)``). A ragged result keeps the mask fitting of
        :mod:`pikv_press.compat` alive until the cache is garbage-collected, as a live press does.
        """
        cache = self.full_cache(cache_factory)
        # head-wise masks of a previous replay (AdaKV) must not leak
        headwise.clear_masks(layer.self_attn for layer in language_model_of(self.model).layers)
        if press is None:
            return cache
        if compat.has_moe_correct_call(press):
            from pikv_press import kvzip

            kvzip.replay(press, self)
            return cache
        if not can_replay(press):
            raise ValueError(
                f"{type(press).__name__} runs its own forward passes or decoding-time hooks and cannot be replayed "
                "from a recorded prefill: run it with `with press(model): model.model(...)` instead."
            )
        with torch.no_grad():
            if not compat.is_moe_aware(press):  # kvpress's own path, exactly as `with press(model)` without pikv-press
                self._replay_plain(press, cache)
                return cache
            anatomy = compat.moe_anatomy_for_press(self.model)
            if anatomy is None:
                press.post_init_from_model(self.model)  # as kvpress's own __call__ does
            # a press that decides once the whole prefill is seen (KVzipSurrogatePress) brackets the hooks
            begin, finish = getattr(press, "begin_prefill", None), getattr(press, "finish_prefill", None)
            with compat.press_scope(press, self.model, anatomy) as caches:
                caches.append(cache)
                if begin is not None:
                    begin()
                if anatomy is None:
                    self._replay_plain(press, cache)
                else:
                    routed = compat.needs_routing(press)
                    if routed and not self.routing:
                        raise ValueError(f"{type(press).__name__} reads the routing of each layer, and this record "
                                         "holds none: record the prefill with PrefillRecorder on an MoE model.")
                    views = compat.make_views(anatomy)
                    if routed:
                        compat.plan_layers(press, self.routing, sorted(views))
                    for idx, view in views.items():
                        kwargs = dict(self.layers[idx].kwargs, past_key_values=cache)
                        if routed:  # as the live hooks hand it over (compat._RoutedHooks), in the same layer order
                            kwargs[compat.ROUTING_KWARG] = self.routing[compat.routing_source_layer(anatomy, idx)]
                        compat.press_hook(press, view)(view.module, (), kwargs, (None, self.layers[idx].attentions))
                if finish is not None:
                    finish(self.model)
        return cache

    def _replay_plain(self, press: BasePress, cache: Cache) -> None:
        """kvpress's own hook on every layer, as kvpress's ``BasePress.__call__`` attaches it."""
        if not compat.is_moe_aware(press):
            press.post_init_from_model(self.model)
        language_model = language_model_of(self.model)
        for idx in range(self.num_layers):
            module = language_model.layers[idx].self_attn
            module.rotary_emb = language_model.rotary_emb  # as kvpress's __call__ does
            kwargs = dict(self.layers[idx].kwargs, past_key_values=cache)
            press.forward_hook(module, (), kwargs, (None, self.layers[idx].attentions))


class PrefillRecorder:
    """Context manager recording one prefill of ``model`` for :meth:`PrefillSnapshot.replay`.

    >>> with PrefillRecorder(model) as recorder:
    ...     model.model(input_ids=context_ids, past_key_values=DynamicCache())
    >>> cache = recorder.snapshot.replay(SnapKVPress(0.5))

    Memory: the attention input of every layer ``(batch, seq, hidden)`` and the full cache, plus the attention
    weights ``(batch, heads, seq, seq)`` of every layer when the model computes them (eager attention), plus the
    routing of every MoE layer (:class:`~pikv_press.moe.RoutingRecorder`: expert ids and weights, ``(seq, top_k)``).
    """

    def __init__(self, model: nn.Module):
        anatomy = get_anatomy(model)  # a clear error for unsupported models
        self.model = model
        self.snapshot = PrefillSnapshot(model=model)
        self._hooks: list = []
        self._routing = RoutingRecorder(model) if anatomy.has_router else None

    def __enter__(self) -> PrefillRecorder:
        layers = language_model_of(self.model).layers
        self.snapshot.num_layers = len(layers)
        try:
            self._hooks.append(language_model_of(self.model).register_forward_pre_hook(self._record_ids,
                                                                                       with_kwargs=True))
            for layer in layers:
                self._hooks.append(layer.self_attn.register_forward_hook(self._record, with_kwargs=True))
            if self._routing is not None:
                self._routing.__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._routing is not None:
            self._routing.__exit__()
            for idx in self._routing.anatomy.moe_layers:
                try:
                    self.snapshot.routing[idx] = self._routing.routing(idx)
                except ValueError:  # nothing recorded (no forward pass, or it raised)
                    continue
            self._routing.reset()

    def _record_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.snapshot.input_ids = None if ids is None else ids.detach().clone()

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise ValueError("PrefillRecorder needs a forward pass with a cache: pass past_key_values=DynamicCache().")
        access = layer_access(cache.layers[module.layer_idx])
        if access.seq_length() != kwargs["hidden_states"].shape[1]:
            raise ValueError("PrefillRecorder records one prefill from an empty cache; start from a new DynamicCache.")
        keys, values = access.read()
        kept = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        self.snapshot.layers[module.layer_idx] = _LayerRecord(
            kwargs=kept, attentions=attentions, keys=keys.detach().clone(), values=values.detach().clone()
        )
