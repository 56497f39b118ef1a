"""kvpress on every MoE family.

kvpress 0.5.5 runs on MoE models only by accident (see ``shared/KVPRESS_NOTES.md``): query-based scorers skip the
query norm of Qwen3-MoE and OLMoE, crash on GPT-OSS's half-width rotary tables and on DeepSeek's latent attention,
ignore GPT-OSS's attention sinks and compress sliding-window layers. :func:`install` (called on ``import pikv_press``)
makes every kvpress press, used as a context manager or through ``pipeline("kv-press-text-generation")``, compute
the right thing on the MoE families of :mod:`pikv_press.moe`:

* ``BasePress.__call__`` hooks the attention modules that :class:`~pikv_press.moe.MoEAnatomy` calls compressible
  (sliding-window layers are left uncompressed, as kvpress does for Gemma3) and hands each press an
  :class:`AttentionView` of the module instead of the module itself. The view presents queries, keys and rotary
  tables in the canonical layout of :class:`~pikv_press.moe.attention.AttentionLayout`, where kvpress's formulas
  (``q_proj(h).view(...)``, ``q * cos + rotate_half(q) * sin``, ``/ sqrt(head_dim)``) give the model's own logits.
  Where the cached keys are not in that layout (GLM-4-MoE partial RoPE, DeepSeek MLA, whose values are also narrower
  than keys) the cache layer is put in canonical layout for the duration of the press's hook and restored after,
  also when the hook raises.
* ``ExpectedAttentionPress.score`` and ``SnapKVPress.compute_window_attention`` (SnapKV, PyramidKV, TOVA) count
  attention sinks (GPT-OSS) in their softmax.
* ``ComposedPress`` hands later presses no attention weights once an earlier press has pruned keys (the weights
  describe keys that are gone); they recompute them from queries.
* Ragged caches decode correctly: transformers builds one attention mask per forward pass from the length of the
  first layer's cache, which is wrong for layers that hold fewer (PyramidKV budgets) or more (uncompressed
  sliding-window layers of GPT-OSS) tokens; it then crashes on a shape mismatch or, in eager attention, masks the
  wrong keys. :func:`enable_ragged_cache_masks` (applied to a model the first time a press is used on it) fits each
  layer's mask to that layer's cache length.
* Combinations that cannot be made right raise a ``ValueError`` that says what to do.

Models outside the MoE registry (dense Llama, Qwen3, Gemma3, ...) keep kvpress's own behaviour untouched.
:func:`uninstall` restores kvpress exactly.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any

import torch
from kvpress import AdaKVPress, BasePress, ComposedPress, ExpectedAttentionPress, SnapKVPress
from kvpress.presses.base_press import is_prefilling
from kvpress.utils import get_prerope_query_states
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from pikv_press.moe import AttentionLayout, MoEAnatomy, get_anatomy, language_model_of

logger = logging.getLogger(__name__)

_ORIGINAL_CALL = BasePress.__call__
_ORIGINAL_EXPECTED_ATTENTION_SCORE = ExpectedAttentionPress.score
_ORIGINAL_WINDOW_ATTENTION = SnapKVPress.__dict__["compute_window_attention"]
_installed = False


class _ConfigView:
    """A model config with a few attributes overridden (head sizes in canonical layout)."""

    def __init__(self, config: Any, **overrides: Any):
        self.__dict__["_config"] = config
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_config"], name)


class AttentionView:
    """What a kvpress press receives as ``module``: one attention module presented in canonical layout.

    ``q_proj``/``k_proj`` return pre-RoPE queries/keys ``(batch, seq, heads * head_dim)`` already normalised (QK norm)
    and scaled; ``q_norm``/``k_norm`` are identities so that nothing is applied twice; ``rotary_emb`` and the
    ``position_embeddings`` handed to the press give canonical full-width ``(cos, sin)``; ``head_dim`` and
    ``config.head_dim`` are the key width. Every other attribute is read from and written to the real module (so
    ``masked_key_indices`` set by AdaKV reaches the patched attention function).
    """

    def __init__(self, module: nn.Module, layout: AttentionLayout, rotary_emb: nn.Module | None):
        d = self.__dict__
        d["_module"] = module
        d["_layout"] = layout
        d["_rotary_emb"] = rotary_emb
        d["layer_idx"] = module.layer_idx
        d["head_dim"] = layout.qk_dim
        d["num_key_value_heads"] = layout.num_kv_heads
        d["num_key_value_groups"] = layout.num_heads // layout.num_kv_heads
        d["config"] = _ConfigView(
            module.config,
            head_dim=layout.qk_dim,
            num_attention_heads=layout.num_heads,
            num_key_value_heads=layout.num_kv_heads,
        )

    @property
    def layout(self) -> AttentionLayout:
        return self.__dict__["_layout"]

    @property
    def module(self) -> nn.Module:
        return self.__dict__["_module"]

    def q_proj(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q = self.layout.canonical_queries(hidden_states)  # (batch, heads, seq, head_dim)
        return q.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)

    def k_proj(self, hidden_states: torch.Tensor) -> torch.Tensor:
        k = self.layout.canonical_keys(hidden_states)  # (batch, kv_heads, seq, head_dim)
        return k.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)

    @staticmethod
    def q_norm(states: torch.Tensor) -> torch.Tensor:
        return states

    @staticmethod
    def k_norm(states: torch.Tensor) -> torch.Tensor:
        return states

    def rotary_emb(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.__dict__["_rotary_emb"]
        if rotary is None:
            raise ValueError("This model has no rotary embedding module; presses that need one cannot run on it.")
        return self.layout.canonical_rope(rotary(x, position_ids))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_module"], name, value)

    def __repr__(self) -> str:
        return f"AttentionView({type(self.module).__name__}, layer {self.layer_idx})"


def _inner_presses(press: Any) -> list[Any]:
    """The press and every press wrapped inside it (AdaKV, Decoding, Composed, PerLayer, ...)."""
    found, stack = [], [press]
    while stack:
        current = stack.pop()
        if current is None or any(current is p for p in found):
            continue
        found.append(current)
        for attr in ("press", "base_press", "scorer"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BasePress):
                stack.append(inner)
        stack.extend(p for p in getattr(current, "presses", None) or [] if isinstance(p, BasePress))
    return found


def check_press_supported(press: BasePress, anatomy: MoEAnatomy) -> None:
    """Raise ``ValueError`` for press/model combinations that cannot compute the right thing."""
    attn_impl = getattr(anatomy.config, "_attn_implementation", None) or getattr(
        anatomy.model.config, "_attn_implementation", None
    )
    if attn_impl == "eager" and any(isinstance(p, AdaKVPress) for p in _inner_presses(press)):
        hint = (
            "GPT-OSS supports only eager attention in this transformers version, so head-wise AdaKV cannot run on it"
            if anatomy.family.name == "gpt_oss"
            else "load the model with attn_implementation='sdpa'"
        )
        raise ValueError(
            "AdaKVPress masks keys inside the patched attention functions, which eager attention does not go "
            f"through: {hint}."
        )


def _run_press(press: BasePress, view: AttentionView, args: tuple, kwargs: dict, output: Any) -> Any:
    if not isinstance(press, ComposedPress):
        return press.forward_hook(view, args, kwargs, output)
    # ComposedPress.forward_hook, except that attention weights are dropped once keys have been pruned.
    layer = kwargs["past_key_values"].layers[view.layer_idx]
    inner_output, retained = output, 1.0
    for inner in press.presses:
        before = layer.keys.shape[2]
        inner_output = inner.forward_hook(view, args, kwargs, inner_output)
        pruned = layer.keys.shape[2] != before
        if pruned and isinstance(inner_output, tuple) and len(inner_output) > 1 and inner_output[1] is not None:
            inner_output = (inner_output[0], None, *inner_output[2:])
        retained *= 1 - inner.compression_ratio
    press.compression_ratio = 1 - retained
    return output


def _make_hook(press: BasePress, layout: AttentionLayout, view: AttentionView):
    default_hook = type(press).forward_hook is BasePress.forward_hook

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if cache is None:  # a forward pass without cache has nothing to compress
            return output
        if default_hook and not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            return output  # BasePress.forward_hook only acts at prefill: skip the layout work on every decoding step
        press_kwargs = dict(kwargs)
        press_kwargs["position_embeddings"] = layout.canonical_rope(kwargs["position_embeddings"])
        if not layout.needs_cache_transform:
            return _run_press(press, view, args, press_kwargs, output)
        if isinstance(cache, QuantizedCache):
            raise ValueError(
                f"{type(module).__name__} stores keys in a layout that kvpress cannot score in place (partial or "
                "latent RoPE) and QuantizedCache cannot be rearranged: use a DynamicCache with this model."
            )
        layer = cache.layers[module.layer_idx]
        layer.keys = layout.keys_to_canonical(layer.keys)
        layer.values = layout.values_to_canonical(layer.values)
        try:
            return _run_press(press, view, args, press_kwargs, output)
        finally:
            layer.keys = layout.keys_from_canonical(layer.keys)
            layer.values = layout.values_from_canonical(layer.values)

    return hook


_MASK_FIX_ATTR = "_pikv_ragged_mask_hook"


def _fit_mask_to_layer(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: cut or extend the attention mask to this layer's cached length plus the new tokens.

    Queries of a decoding step come after every cached token, so a layer holding ``n`` tokens needs the last
    ``n + q_len`` columns of the mask (its causal block over the new tokens is the last ``q_len`` columns); a layer
    holding more than the mask covers needs extra "attend" columns on the left.
    """
    mask = kwargs.get("attention_mask")
    cache = kwargs.get("past_key_values")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or cache is None or not hasattr(cache, "layers"):
        return None
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
        return None  # static and sliding-window layers size their masks themselves
    q_len = kwargs["hidden_states"].shape[1]
    kv_len = layer.get_seq_length() + q_len
    width = mask.shape[-1]
    if width == kv_len or layer.get_seq_length() == 0:
        return None
    if width > kv_len:
        fitted = mask[..., width - kv_len :]
    else:
        attend = True if mask.dtype == torch.bool else 0.0
        fitted = F.pad(mask, (kv_len - width, 0), value=attend)
    kwargs["attention_mask"] = fitted
    return args, kwargs


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's attention module (none for a model without decoder layers)."""
    try:
        layers = language_model_of(model).layers
    except ValueError:
        return []
    return [layer.self_attn for layer in layers if getattr(layer, "self_attn", None) is not None]


def enable_ragged_cache_masks(model: nn.Module) -> None:
    """Let ``model`` decode from caches whose layers hold different numbers of tokens (idempotent).

    Registers one forward pre-hook per attention module; it changes nothing while all layers hold the same number
    of tokens. Undo with :func:`disable_ragged_cache_masks`.
    """
    for attention in _attention_modules(model):
        if getattr(attention, _MASK_FIX_ATTR, None) is None:
            handle = attention.register_forward_pre_hook(_fit_mask_to_layer, with_kwargs=True)
            object.__setattr__(attention, _MASK_FIX_ATTR, handle)


def disable_ragged_cache_masks(model: nn.Module) -> None:
    """Remove the hooks of :func:`enable_ragged_cache_masks`."""
    for attention in _attention_modules(model):
        handle = getattr(attention, _MASK_FIX_ATTR, None)
        if handle is not None:
            handle.remove()
            object.__delattr__(attention, _MASK_FIX_ATTR)


def _moe_anatomy_or_none(model: nn.Module) -> MoEAnatomy | None:
    try:
        anatomy = get_anatomy(model)
    except (ValueError, TypeError):
        return None
    return anatomy if anatomy.family.is_moe else None


@contextmanager
def _moe_aware_call(self: BasePress, model: nn.Module):
    """``BasePress.__call__`` for MoE families (kvpress's own for every other model)."""
    enable_ragged_cache_masks(model)
    anatomy = _moe_anatomy_or_none(model)
    if anatomy is None:
        with _ORIGINAL_CALL(self, model):
            yield
        return
    check_press_supported(self, anatomy)
    self.post_init_from_model(model)
    rotary_emb = getattr(anatomy.language_model, "rotary_emb", None)
    hooks = []
    try:
        for layer_idx in anatomy.compressible_layers:
            module = anatomy.attention(layer_idx)
            layout = AttentionLayout(module, anatomy.family, anatomy.config)
            view = AttentionView(module, layout, rotary_emb)
            hooks.append(module.register_forward_hook(_make_hook(self, layout, view), with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _expected_attention_score(self, module, hidden_states, keys, values, attentions, kwargs):
    """``ExpectedAttentionPress.score`` with attention sinks counted in the softmax (GPT-OSS).

    A sink adds ``exp(sink_h)`` to head ``h``'s softmax denominator, so a head that parks attention on its sink
    gives every key less weight; without it, the heads of a group would be averaged on the wrong scale.
    """
    sinks = getattr(module, "sinks", None)
    if sinks is None:
        return _ORIGINAL_EXPECTED_ATTENTION_SCORE(self, module, hidden_states, keys, values, attentions, kwargs)
    if keys.size(2) <= self.n_sink:
        raise ValueError(f"ExpectedAttentionPress needs more than n_sink={self.n_sink} tokens, got {keys.size(2)}.")
    keys, values = keys[:, :, self.n_sink :], values[:, :, self.n_sink :]
    mean_query, cov_query = self.get_query_statistics(module, hidden_states)  # (b, heads, d), (b, heads, d, d)
    bsz, num_kv_heads, k_len, head_dim = keys.shape
    groups = module.config.num_attention_heads // num_kv_heads
    expanded = repeat_kv(keys, groups)  # (b, heads, k_len, d)
    logits = torch.einsum("bhd,bhnd->bhn", mean_query, expanded) / math.sqrt(head_dim)
    if self.use_covariance:
        logits = logits + torch.einsum("bhnd,bhde,bhne->bhn", expanded, cov_query, expanded) / head_dim / 2
    sink_logits = sinks.to(logits.dtype).view(1, -1, 1).expand(bsz, -1, 1)
    scores = F.softmax(torch.cat([logits, sink_logits], dim=-1), dim=-1)[..., :-1]
    scores = scores.view(bsz, num_kv_heads, groups, k_len).mean(dim=2)
    if self.use_vnorm:
        scores = (scores + self.epsilon) * values.norm(dim=-1)
    return F.pad(scores, (self.n_sink, 0), value=scores.max().item() + 1)


def _window_attention(module, hidden_states, keys, window_size, position_embeddings):
    """``SnapKVPress.compute_window_attention`` with attention sinks in the softmax (GPT-OSS).

    Attention weights of the last ``window_size`` queries over the keys before the window,
    ``(batch, heads, window_size, k_len - window_size)``.
    """
    sinks = getattr(module, "sinks", None)
    if sinks is None:
        return _ORIGINAL_WINDOW_ATTENTION.__func__(module, hidden_states, keys, window_size, position_embeddings)
    bsz, num_kv_heads, k_len, head_dim = keys.shape
    groups = module.config.num_attention_heads // num_kv_heads
    query = get_prerope_query_states(module, hidden_states[:, -window_size:])  # (b, heads, window, d)
    cos, sin = (t[:, -window_size:].unsqueeze(1) for t in position_embeddings)
    query = query * cos + rotate_half(query) * sin
    logits = torch.matmul(query, repeat_kv(keys, groups).transpose(2, 3)) / math.sqrt(head_dim)
    causal = torch.full_like(logits, float("-inf")).triu(diagonal=k_len - window_size + 1)
    sink_logits = sinks.to(logits.dtype).view(1, -1, 1, 1).expand(bsz, -1, window_size, 1)
    weights = F.softmax(torch.cat([logits + causal, sink_logits], dim=-1), dim=-1, dtype=torch.float32)
    return weights[..., :-1].to(query.dtype)[..., :-window_size]


def view_attention_errors(model: nn.Module, input_ids: torch.Tensor, window: int = 8) -> list[float]:
    """How exactly presses see a model: per compressible layer, the largest difference between the attention weights
    kvpress's window attention computes through :class:`AttentionView` and the model's own eager attention weights.

    ``model`` must run eager attention (the weights are read from the attention output); ``input_ids`` needs more
    than ``window`` tokens.
    """
    anatomy = get_anatomy(model)
    if getattr(anatomy.config, "_attn_implementation", None) != "eager":
        raise ValueError("view_attention_errors reads eager attention weights: load the model with "
                         "attn_implementation='eager'.")
    rotary_emb = getattr(anatomy.language_model, "rotary_emb", None)
    errors = []

    def hook(module, args, kwargs, output):
        layout = AttentionLayout(module, anatomy.family, anatomy.config)
        view = AttentionView(module, layout, rotary_emb)
        rope = layout.canonical_rope(kwargs["position_embeddings"])
        keys = layout.keys_to_canonical(kwargs["past_key_values"].layers[module.layer_idx].keys)
        ours = SnapKVPress.compute_window_attention(view, kwargs["hidden_states"], keys, window, rope)
        errors.append((ours - output[1][..., -window:, :-window]).abs().max().item())

    handles = [anatomy.attention(i).register_forward_hook(hook, with_kwargs=True) for i in anatomy.compressible_layers]
    try:
        with torch.no_grad():
            anatomy.language_model(input_ids=input_ids, past_key_values=DynamicCache())
    finally:
        for handle in handles:
            handle.remove()
    return errors


def install() -> None:
    """Make kvpress presses MoE-aware (idempotent). Called on ``import pikv_press``."""
    global _installed
    if _installed:
        return
    BasePress.__call__ = _moe_aware_call
    ExpectedAttentionPress.score = _expected_attention_score
    SnapKVPress.compute_window_attention = staticmethod(_window_attention)
    _installed = True
    logger.debug("pikv-press: kvpress presses are now MoE-aware")


def uninstall() -> None:
    """Restore kvpress's own behaviour."""
    global _installed
    BasePress.__call__ = _ORIGINAL_CALL
    ExpectedAttentionPress.score = _ORIGINAL_EXPECTED_ATTENTION_SCORE
    SnapKVPress.compute_window_attention = _ORIGINAL_WINDOW_ATTENTION
    _installed = False


def is_installed() -> bool:
    return _installed
