"""Attention statistics gathered inside the attention computation, for decode-time policies.

``with track(model, policy):`` switches the model's attention implementation (its config's
``_attn_implementation``) to a function registered through transformers' ``AttentionInterface`` that

1. computes the layer's output with the model's own implementation (``sdpa``, ``eager`` or any registered one,
   called exactly as the model would: the output is bit for bit the same), and
2. for the layers a policy compresses, computes the attention probabilities of the pass's queries over the layer's
   keys (the same queries, keys, mask, scaling and attention sinks the model used; in blocks of
   :data:`QUERY_BLOCK` queries, so memory stays ``heads x block x keys``) and hands the policies an
   :class:`~pikv_press.scheduling.state.AttentionStep`.

Nothing else changes: the model keeps SDPA for its output (no eager attention forced on the whole model). The
previous implementation is restored on exit, also when the block raises. Sliding-window layers (GPT-OSS) are not
observed: they are never compressed. Attention-logit soft-capping is applied when the model passes ``softcap``.

:func:`override_attention` is the switch itself (also used by :mod:`pikv_press.scheduling.quest`).
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from pikv_press.moe import get_anatomy, language_model_of
from pikv_press.scheduling.base import AttentionStatsPolicy
from pikv_press.scheduling.state import AttentionStep

QUERY_BLOCK = 256
"""Queries per block when attention probabilities are computed for statistics."""

_PREFIX = "pikv_"
_OVERRIDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> (handler, original name)


def original_attention(module: nn.Module, name: str) -> Callable:
    """The attention function the model would call for implementation ``name`` (``eager``: the module's own
    ``eager_attention_forward``, which carries family details such as GPT-OSS's sinks)."""
    if name == "eager":
        function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if function is None:
            raise ValueError(f"{type(module).__name__}'s module has no eager_attention_forward to fall back to.")
        return function
    return ALL_ATTENTION_FUNCTIONS[name]


def _dispatch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: Any):
    entry = _OVERRIDES.get(module)
    if entry is None:
        raise ValueError(
            f"{type(module).__name__} runs a pikv-press attention implementation outside its `with` block (a model "
            "config shared with another model, or a config saved while tracking): set "
            "model.config._attn_implementation back to 'sdpa'."
        )
    handler, original = entry
    return handler(original_attention(module, original), module, query, key, value, attention_mask, **kwargs)


@contextmanager
def override_attention(model: nn.Module, kind: str, handlers: dict[int, Callable]) -> Iterator[None]:
    """Inside the block, layer ``i``'s attention calls ``handlers[i](original, module, query, key, value, mask,
    **kwargs)`` (``original`` is the model's own function); other layers run the model's own function.

    The implementation is registered as ``pikv_<kind>_<original>`` with the original's mask function; the config's
    ``_attn_implementation`` is restored on exit. Nesting two overrides on one model raises ``ValueError``.
    """
    layers = language_model_of(model).layers
    modules = [layer.self_attn for layer in layers]
    config = modules[0].config
    if any(m.config is not config for m in modules):
        raise ValueError("The attention modules of this model do not share one config; pikv-press cannot switch "
                         "their attention implementation.")
    original = config._attn_implementation
    if not isinstance(original, str):
        raise ValueError(f"Unsupported attention implementation {original!r}: load the model with "
                         "attn_implementation='sdpa'.")
    if original.startswith(_PREFIX) or any(m in _OVERRIDES for m in modules):
        raise ValueError(f"This model's attention is already switched by pikv-press ({original}): pikv-press's "
                         "attention statistics and Quest cannot be nested on one model; use one block at a time.")
    if original != "eager" and (original not in ALL_ATTENTION_FUNCTIONS or original not in
                                ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
        raise ValueError(f"pikv-press wraps the 'sdpa' and 'eager' attention implementations (and those registered "
                         f"with a mask function), not {original!r}: load the model with attn_implementation='sdpa'.")
    name = f"{_PREFIX}{kind}_{original}"
    AttentionInterface.register(name, _dispatch)
    AttentionMaskInterface.register(name, eager_mask if original == "eager" else ALL_MASK_ATTENTION_FUNCTIONS[original])

    def passthrough(fn, module, *args, **kwargs):
        return fn(module, *args, **kwargs)

    try:
        for idx, module in enumerate(modules):
            _OVERRIDES[module] = (handlers.get(getattr(module, "layer_idx", idx), passthrough), original)
        config._attn_implementation = name
        yield
    finally:
        config._attn_implementation = original
        for module in modules:
            _OVERRIDES.pop(module, None)


# -- attention probabilities -----------------------------------------------------------------------------------------
def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, sinks: torch.Tensor | None = None,
                            softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, visible)`` of ``query`` (batch, heads, q, d) over ``key`` (batch, kv_heads, keys, d), as the model's
    attention computes them: logits ``q . k * scaling`` (default ``1 / sqrt(d)``), soft-capped when ``softcap``,
    masked by ``attention_mask`` (bool: true = attend; float: added; ``None``: causal, the queries being the last
    ``q`` keys), normalised by a softmax that also counts per-head attention sinks ``sinks`` (heads,) when given.
    ``probs`` (batch, heads, q, keys) float32; ``visible`` broadcastable bool."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    logits = torch.matmul(query.float(), _repeat_kv(key, heads // key.shape[1]).float().transpose(2, 3)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if attention_mask is None:
        rows = torch.arange(q_len, device=query.device).view(-1, 1) + (k_len - q_len)
        visible = (torch.arange(k_len, device=query.device).view(1, -1) <= rows).view(1, 1, q_len, k_len)
        logits = logits.masked_fill(~visible, float("-inf"))
    else:
        mask = attention_mask[..., :k_len]
        if mask.dtype == torch.bool:
            visible = mask
            logits = logits.masked_fill(~visible, float("-inf"))
        else:
            logits = logits + mask.float()
            visible = torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)
    if sinks is not None:
        sink = sinks.float().view(1, heads, 1, 1).expand(batch, heads, q_len, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0), visible


def attention_step(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                   access_threshold: float, scaling: float | None = None, sinks: torch.Tensor | None = None,
                   softcap: float | None = None, block: int = QUERY_BLOCK) -> AttentionStep:
    """The :class:`AttentionStep` of one forward pass, computed in blocks of ``block`` queries."""
    q_len, kv_heads = query.shape[2], key.shape[1]
    step = None
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        # the block's queries see the keys up to their own position: cut the mask to the block's rows
        mask = None if attention_mask is None else attention_mask[..., start:stop, :] if attention_mask.shape[-2] > 1 \
            else attention_mask
        if mask is None and stop < q_len:  # causal alignment for a block that is not the last: cut the keys
            sub_key = key[:, :, : key.shape[2] - (q_len - stop)]
        else:
            sub_key = key
        probs, visible = attention_probabilities(query[:, :, start:stop], sub_key, mask, scaling, sinks, softcap)
        part = AttentionStep.from_probs(probs, kv_heads, access_threshold, visible)
        if sub_key.shape[2] < key.shape[2]:
            pad = key.shape[2] - sub_key.shape[2]
            part = AttentionStep(torch.nn.functional.pad(part.received, (0, pad)),
                                 torch.nn.functional.pad(part.last_access, (0, pad), value=-1),
                                 torch.nn.functional.pad(part.accesses, (0, pad)), part.num_queries)
        step = part if step is None else step + part
    return step


def _statistics_handler(policies: list[AttentionStatsPolicy]):
    thresholds = sorted({float(p.access_threshold) for p in policies})

    def handler(original, module, query, key, value, attention_mask, **kwargs):
        output = original(module, query, key, value, attention_mask, **kwargs)
        if query.shape[2] == 0:
            return output
        sinks = kwargs.get("s_aux")
        if sinks is None:
            sinks = kwargs.get("sinks")
        with torch.no_grad():
            for threshold in thresholds:
                step = attention_step(query, key, attention_mask, threshold, kwargs.get("scaling"), sinks,
                                      kwargs.get("softcap"))
                for policy in policies:
                    if float(policy.access_threshold) == threshold:
                        policy.observe(module.layer_idx, step)
        return output

    return handler


def stats_policies(presses: tuple) -> list[AttentionStatsPolicy]:
    """The :class:`AttentionStatsPolicy` objects in ``presses`` and the presses nested in them."""
    from pikv_press.compat import inner_presses

    found: list[AttentionStatsPolicy] = []
    for press in presses:
        for inner in inner_presses(press):
            if isinstance(inner, AttentionStatsPolicy) and not any(inner is p for p in found):
                found.append(inner)
    return found


@contextmanager
def track(model: nn.Module, *presses: Any) -> Iterator[None]:
    """Feed the attention statistics of every forward pass of ``model`` to the policies in ``presses`` (and nested in
    them) inside the block; policies that read routing (``uses_routing``) also get the routing recorder they need.
    Presses without statistics are ignored (the block then changes nothing)."""
    policies = stats_policies(presses)
    if not policies:
        yield
        return
    anatomy = get_anatomy(model)
    handler = _statistics_handler(policies)
    with ExitStack() as stack:
        stack.enter_context(override_attention(model, "stats", {i: handler for i in anatomy.compressible_layers}))
        for policy in policies:
            scope = getattr(policy, "routing_scope", None)
            if scope is not None:
                stack.enter_context(scope(model))
        yield
