"""kvpress on every MoE family, turned on explicitly and locally.

kvpress 0.5.5 runs on MoE models only by accident (see ``shared/KVPRESS_NOTES.md``): query-based scorers skip the
query norm of Qwen3-MoE and OLMoE, crash on GPT-OSS's half-width rotary tables and on DeepSeek's latent attention,
ignore GPT-OSS's attention sinks and compress sliding-window layers. Importing pikv-press changes none of that; a user
asks for MoE-correct behaviour in one of three ways:

* ``MoEAware(press)``: a copy of ``press`` whose ``press(model)`` context manager is MoE-aware (the press keeps its
  class as a base, so kvpress's pipeline still sees a ``DecodingPress`` or a ``FinchPress`` for what it is)::

      pipe(context, question=q, press=MoEAware(SnapKVPress(0.5)))

* ``with kvpress_moe_support():`` every kvpress press used inside the block is MoE-aware; kvpress is restored on exit;
* ``install()`` / ``uninstall()``: the same switch, process-wide, for existing scripts.

What MoE-aware means (one mechanism, :func:`attach`, which the prefill replay reuses):

* presses hook only the attention modules that :class:`~pikv_press.moe.MoEAnatomy` calls compressible
  (sliding-window layers are left uncompressed) and receive an :class:`AttentionView` of each module: queries, keys
  and rotary tables in the canonical layout of :class:`~pikv_press.moe.attention.AttentionLayout`, where kvpress's
  formulas (``q_proj(h).view(...)``, ``q * cos + rotate_half(q) * sin``, ``/ sqrt(head_dim)``) give the model's own
  logits. *Canonical layout*: head dimensions permuted so that every rotated pair sits at ``(j, j + d/2)``, values
  zero-padded to the key width (DeepSeek's latent attention) and queries pre-scaled.
* the press scores canonical copies of the layer's keys and values, read through the cache-layer interface
  (:func:`pikv_press.cache.layer_access`); the rows it keeps are mapped back to the cache's own layout (an inverse
  permutation of the kept rows, nothing for Llama-like layouts) and written through the same interface, so dynamic
  and quantized caches are compressed alike. Presses with their own forward hook (``DecodingPress``, ...) read the
  cache themselves: for layouts that differ from the canonical one the layer is presented in canonical layout during
  their hook and restored after, also when the hook raises.
* ``ExpectedAttentionPress.score`` and ``SnapKVPress.compute_window_attention`` (SnapKV, PyramidKV, TOVA) count
  attention sinks (GPT-OSS) in their softmax when they score through an :class:`AttentionView`; plain modules get
  kvpress's own functions, even while a MoE-aware press runs.
* ``ComposedPress`` hands later presses no attention weights once an earlier press has pruned keys.
* *Ragged caches* (layers holding different numbers of tokens, after PyramidKV): transformers sizes one attention
  mask per forward pass from the first layer, which crashes or masks the wrong keys on the others. A forward
  pre-hook per attention module fits each layer's mask to its cache length. It exists while a MoE-aware press is
  active and, when that press left a ragged cache behind, until that cache is garbage-collected (so that the
  pipeline can decode from it); nothing stays on the model after that.
* *Routing for presses* (presses whose ``needs_routing`` is true, such as pikv-press's routing presses with
  ``routing="actual"``): the routing of layer ``l`` exists only after layer ``l``'s MoE block, which runs after its
  attention. For such presses the attention hook sets the layer aside at prefill and the press runs, with the same
  arguments, in a forward hook of the decoder layer whose MoE block gives the routing (dense layers borrow the
  routing of the nearest MoE layer, :func:`routing_source_layer`), in layer order. The routing (a
  :class:`~pikv_press.moe.ContextRouting` from a :class:`~pikv_press.moe.RoutingRecorder`) reaches the press in its
  ``kwargs`` under :data:`ROUTING_KWARG`. This is the cache a hook in the attention would have produced: during
  prefill no layer reads its own cache again after its attention, and nothing the press does changes the hidden
  states that flow on.
* combinations that cannot be made right raise a ``ValueError`` that says what to do; a model of a known family whose
  layout differs from what pikv-press knows raises; an MoE model of an unknown family gets kvpress's own behaviour
  with a warning; dense models always get kvpress's own behaviour.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import kvpress
import torch
from kvpress import AdaKVPress, BasePress, ComposedPress, ExpectedAttentionPress, SnapKVPress
from kvpress.presses.base_press import is_prefilling
from kvpress.utils import get_prerope_query_states
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from pikv_press.cache.layers import DynamicLayerAccess, layer_access
from pikv_press.moe import AttentionLayout, MoEAnatomy, RoutingRecorder, get_anatomy, language_model_of
from pikv_press.moe.families import looks_like_moe

logger = logging.getLogger(__name__)

_ORIGINAL_CALL = BasePress.__call__
_ORIGINAL_EXPECTED_ATTENTION_SCORE = ExpectedAttentionPress.__dict__["score"]
_ORIGINAL_WINDOW_ATTENTION = SnapKVPress.__dict__["compute_window_attention"]

# Presses that run their own forward passes or hooks outside the attention hook (their __call__ re-prefills or
# re-reads the context): they cannot be made MoE-correct by the attention hook, so they are refused on MoE families,
# except KVzipPress passed as the press itself: MoEAware and the global switches give it a MoE-correct __call__
# (pikv_press.kvzip).
_OWN_CALL_PRESSES = ("KVzipPress", "FastKVzipPress", "KVComposePress", "KVgradPress")
_OWN_CALL_CLASSES = tuple(
    cls for cls in (getattr(kvpress, name, None) for name in _OWN_CALL_PRESSES) if isinstance(cls, type)
)


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

    @property
    def attention_sinks(self) -> torch.Tensor | None:
        """Per-head attention-sink logits ``(heads,)`` of families that have them (GPT-OSS), else ``None``."""
        attr = self.layout.family.sinks_attr
        return None if attr is None else getattr(self.module, attr, None)

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




def inner_presses(press: Any) -> list[BasePress]:
    """The press and every press nested in it, through any dataclass field that holds a press or a list of presses
    (AdaKV's ``press``, DecodingPress's ``base_press``, PrefillDecodingPress's ``prefilling_press`` and
    ``decoding_press``, ComposedPress's ``presses``, ...)."""
    found: list[BasePress] = []
    stack = [press]
    while stack:
        current = stack.pop()
        if not isinstance(current, BasePress) or any(current is p for p in found):
            continue
        found.append(current)
        values = [getattr(current, f.name, None) for f in dataclasses.fields(current)] if dataclasses.is_dataclass(
            current) else []
        for value in values:
            if isinstance(value, BasePress):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, BasePress))
    return found


def has_moe_correct_call(press: BasePress) -> bool:
    """Whether ``press``'s class carries a ``__call__`` that runs its own forward passes MoE-correctly
    (``MoEAware(KVzipPress(...))``, :mod:`pikv_press.kvzip`)."""
    return bool(getattr(type(press).__call__, "__pikv_moe_correct__", False))


def attention_implementation(anatomy: MoEAnatomy) -> str | None:
    """The attention implementation the model runs (``"sdpa"``, ``"eager"``...), from the language model's config
    or, failing that, the top model's."""
    return getattr(anatomy.config, "_attn_implementation", None) or getattr(
        anatomy.model.config, "_attn_implementation", None
    )


def check_press_supported(press: BasePress, anatomy: MoEAnatomy) -> None:
    """Raise ``ValueError`` for press/model combinations that cannot compute the right thing."""
    presses = inner_presses(press)
    for inner in presses:
        if isinstance(inner, _OWN_CALL_CLASSES) and not (has_moe_correct_call(inner) and inner is press):
            raise ValueError(
                f"{type(inner).__name__} re-reads the context with its own forward passes and hooks, which the "
                f"MoE-aware attention hook does not reach: on {anatomy.family.name} it would score with the wrong "
                "queries (or crash on latent attention). Use a prefill press instead (SnapKVPress, "
                "ExpectedAttentionPress with AdaKVPress, TOVAPress, KeyDiffPress) or MoEAware(KVzipPress(...)) as the "
                "press itself (not nested), or run it without MoEAware to get kvpress's own behaviour."
            )
    attn_impl = attention_implementation(anatomy)
    if attn_impl == "eager" and any(isinstance(p, AdaKVPress) for p in presses):
        hint = (
            f"{anatomy.family.name} supports only eager attention in this transformers version, so head-wise AdaKV "
            "cannot run on it"
            if anatomy.family.eager_only
            else "load the model with attn_implementation='sdpa'"
        )
        raise ValueError(
            "AdaKVPress masks keys inside the patched attention functions, which eager attention does not go "
            f"through: {hint}."
        )


# -- routing for presses ------------------------------------------------------------------------------------------
ROUTING_KWARG = "pikv_routing"
"""Key of the press ``kwargs`` that holds the routing of the layer's context tokens (a ``ContextRouting``)."""


def needs_routing(press: BasePress) -> bool:
    """Whether ``press`` or a press nested in it reads the actual routing of each layer (``needs_routing``)."""
    return _any_inner(press, "needs_routing")


def plan_layers(press: BasePress, routing: dict, layers: list[int]) -> None:
    """Let every press nested in ``press`` that budgets across layers (``needs_all_layers``) plan from the context
    routing of every MoE layer; called once the whole prefill has been routed (live hooks and replay alike)."""
    for inner in inner_presses(press):
        if getattr(inner, "needs_all_layers", False):
            inner.plan_layers(routing, layers)


def _needs_all_layers(press: BasePress) -> bool:
    """Whether ``press`` or a press nested in it budgets across layers (``needs_all_layers``)."""
    return _any_inner(press, "needs_all_layers")


def _any_inner(press: BasePress, flag: str) -> bool:
    return any(bool(getattr(p, flag, False)) for p in inner_presses(press))


def routing_source_layer(anatomy: MoEAnatomy, layer_idx: int) -> int:
    """The MoE layer whose routing layer ``layer_idx`` uses: itself, or for a dense layer the nearest MoE layer (the
    earlier one on a tie)."""
    if not anatomy.moe_layers:
        raise ValueError(f"Routing needs an MoE model; {anatomy.describe()}.")
    return min(anatomy.moe_layers, key=lambda m: (abs(m - layer_idx), m))


class _RoutedHooks:
    """Hooks of a press that reads routing: attention hooks set layers aside at prefill, decoder-layer hooks run the
    press once the routing it needs has been recorded (see the module docstring)."""

    def __init__(self, press: BasePress, anatomy: MoEAnatomy, views: dict[int, AttentionView]):
        self.press = press
        self.anatomy = anatomy
        self.views = views
        self.source = {idx: routing_source_layer(anatomy, idx) for idx in views}
        self.all_layers = _needs_all_layers(press)
        if self.all_layers:  # budgets across layers: every layer waits for the routing of the last MoE layer
            self.source = dict.fromkeys(views, max(anatomy.moe_layers))
        self.recorder = RoutingRecorder(anatomy.model)
        self.pending: dict[int, tuple] = {}

    def register(self, handles: list) -> None:
        """Register every hook, appending the handles to ``handles`` as they are made (the recorder is exited by
        :meth:`close`)."""
        self.recorder.__enter__()
        handles.append(self.anatomy.language_model.register_forward_pre_hook(self._start))
        for view in self.views.values():
            handles.append(view.module.register_forward_hook(self._attention_hook(view), with_kwargs=True))
        for idx in range(self.anatomy.num_layers):
            handles.append(self.anatomy.layers[idx].register_forward_hook(self._layer_hook(idx)))

    def close(self) -> None:
        self.recorder.__exit__()
        self.recorder.reset()
        self.pending.clear()

    def _start(self, module, args) -> None:  # every forward pass routes its own tokens
        self.recorder.reset()
        self.pending.clear()

    def _attention_hook(self, view: AttentionView):
        plain = press_hook(self.press, view)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if kwargs.get("past_key_values") is None or not is_prefilling(kwargs["cache_position"],
                                                                           kwargs["hidden_states"].shape[1]):
                return plain(module, args, kwargs, output)
            self.pending[view.layer_idx] = (args, kwargs, output)
            return output

        return hook

    def _layer_hook(self, layer_idx: int):
        def hook(module, args, output) -> None:
            if self.all_layers and self.pending and max(self.source.values()) <= layer_idx:
                plan_layers(self.press, {m: self.recorder.routing(m) for m in self.anatomy.moe_layers},
                            sorted(self.views))
            while self.pending:
                first = min(self.pending)
                if self.source[first] > layer_idx:
                    return  # layers run in order: the first layer waiting needs a later routing
                args_, kwargs, attn_output = self.pending.pop(first)
                routing = self.recorder.routing(self.source[first])
                view = self.views[first]
                press_hook(self.press, view)(view.module, args_, dict(kwargs, **{ROUTING_KWARG: routing}),
                                             attn_output)

        return hook


# -- the hook ------------------------------------------------------------------------------------------------------
def _uses_default_hook(press: BasePress) -> bool:
    return type(press).forward_hook is BasePress.forward_hook


def _compress_layer(press: BasePress, view: AttentionView, kwargs: dict, attentions: Any) -> None:
    """``BasePress.forward_hook``'s work through the cache-layer interface: score canonical copies, keep rows, write
    them back in the cache's own layout."""
    layout = view.layout
    access = layer_access(kwargs["past_key_values"].layers[view.layer_idx])
    keys, values = access.read()
    canonical_keys, canonical_values = layout.keys_to_canonical(keys), layout.values_to_canonical(values)
    kept_keys, kept_values = press.compress(view, kwargs["hidden_states"], canonical_keys, canonical_values,
                                            attentions, kwargs)
    if kept_keys is canonical_keys and kept_values is canonical_values:
        # Nothing pruned (AdaKV masks, ratio 0), or changed in place (ThinK zeroes key channels). Where the canonical
        # tensors are copies of the cache (a layout transform, a quantized or low-rank layer), an in-place change
        # must be written back: compare with a fresh read.
        fresh_keys, fresh_values = access.read()
        if torch.equal(layout.keys_to_canonical(fresh_keys), kept_keys) and torch.equal(
                layout.values_to_canonical(fresh_values), kept_values):
            return
    access.write(layout.keys_from_canonical(kept_keys), layout.values_from_canonical(kept_values))


@contextmanager
def _canonical_cache_layer(cache: Any, layout: AttentionLayout, layer_idx: int) -> Iterator[None]:
    """The layer in canonical layout for a press that reads the cache itself; restored after, also on errors."""
    if not layout.needs_cache_transform:
        yield
        return
    access = layer_access(cache.layers[layer_idx])
    if not isinstance(access, DynamicLayerAccess):
        raise ValueError(
            f"{type(layout.module).__name__} stores keys in a layout that differs from kvpress's (partial or latent "
            "RoPE), and presses with their own forward hook read the cache directly: use a DynamicCache with this "
            "model and press."
        )
    keys, values = access.read()
    access.write(layout.keys_to_canonical(keys), layout.values_to_canonical(values))
    try:
        yield
    finally:
        keys, values = access.read()
        access.write(layout.keys_from_canonical(keys), layout.values_from_canonical(values))


def _run_press(press: BasePress, view: AttentionView, args: tuple, kwargs: dict, output: Any) -> Any:
    if isinstance(press, ComposedPress):
        # ComposedPress.forward_hook, except that attention weights are dropped once keys have been pruned.
        access = layer_access(kwargs["past_key_values"].layers[view.layer_idx])
        inner_output, retained = output, 1.0
        for inner in press.presses:
            before = access.seq_length()
            inner_output = _run_press(inner, view, args, kwargs, inner_output)
            pruned = access.seq_length() != before
            if pruned and isinstance(inner_output, tuple) and len(inner_output) > 1 and inner_output[1] is not None:
                inner_output = (inner_output[0], None, *inner_output[2:])
            retained *= 1 - inner.compression_ratio
        press.compression_ratio = 1 - retained
        return output
    if _uses_default_hook(press):
        if is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            _compress_layer(press, view, kwargs, attentions)
        return output
    with _canonical_cache_layer(kwargs["past_key_values"], view.layout, view.layer_idx):
        return press.forward_hook(view, args, kwargs, output)


def press_hook(press: BasePress, view: AttentionView):
    """The MoE-aware forward hook of ``press`` on ``view``'s attention module (``with_kwargs=True``)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if kwargs.get("past_key_values") is None:  # a forward pass without cache has nothing to compress
            return output
        prefilling = is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1])
        if _uses_default_hook(press) and not prefilling and not isinstance(press, ComposedPress):
            return output  # prefill presses act only at prefill: skip the layout work on every decoding step
        press_kwargs = dict(kwargs, position_embeddings=view.layout.canonical_rope(kwargs["position_embeddings"]))
        return _run_press(press, view, args, press_kwargs, output)

    return hook


def moe_anatomy_for_press(model: nn.Module) -> MoEAnatomy | None:
    """The anatomy when ``model`` is of a known MoE family; ``None`` (kvpress's own behaviour) for dense models and,
    with a warning, for MoE models of unknown families. A known family with an unexpected layout raises."""
    try:
        anatomy = get_anatomy(model)
    except ValueError as error:
        if "does not support model_type" not in str(error):
            raise  # a known family laid out differently: never fall back silently
        if looks_like_moe(getattr(model, "config", None)):
            logger.warning("pikv-press does not know this MoE architecture (%s): kvpress's own behaviour is used, "
                           "which may score with the wrong queries. %s", type(model).__name__, error)
        return None
    return anatomy if anatomy.family.is_moe else None


# -- ragged cache masks --------------------------------------------------------------------------------------------
def fit_mask_to_layer(module: nn.Module, args: tuple, kwargs: dict):
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
    try:
        layers = language_model_of(model).layers
    except ValueError:
        return []
    return [layer.self_attn for layer in layers if getattr(layer, "self_attn", None) is not None]


def _is_ragged(cache: Any) -> bool:
    """Whether the full-attention layers of ``cache`` hold different numbers of tokens."""
    lengths = {layer_access(layer).seq_length() for layer in getattr(cache, "layers", [])
               if isinstance(layer, DynamicLayer) and not isinstance(layer, DynamicSlidingWindowLayer)}
    return len(lengths) > 1


class _RaggedMasks:
    """Mask-fitting pre-hooks on one model's attention modules, shared by every user (presses, scopes, caches)."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module):
        self.model_ref = weakref.ref(model)
        self.users = 0
        self.handles = [m.register_forward_pre_hook(fit_mask_to_layer, with_kwargs=True)
                        for m in _attention_modules(model)]

    @classmethod
    def acquire(cls, model: nn.Module) -> _RaggedMasks:
        masks = cls._by_model.get(model)
        if masks is None:
            masks = cls._by_model[model] = cls(model)
        masks.users += 1
        return masks

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            for handle in self.handles:
                handle.remove()
            model = self.model_ref()
            if model is not None and self._by_model.get(model) is self:
                del self._by_model[model]


@contextmanager
def ragged_cache_masks(model: nn.Module) -> Iterator[None]:
    """Let ``model`` decode from caches whose layers hold different numbers of tokens, inside the block.

    One forward pre-hook per attention module fits the mask to the layer's cache length (it changes nothing while all
    layers hold the same number of tokens); the hooks are removed on exit.
    """
    masks = _RaggedMasks.acquire(model)
    try:
        yield
    finally:
        masks.release()


def _keep_masks_while_alive(masks: _RaggedMasks, caches: list) -> None:
    """Keep ``masks`` until every ragged cache of ``caches`` is garbage-collected, then release them."""
    ragged = [cache for cache in caches if _is_ragged(cache)]
    if not ragged:
        masks.release()
        return
    remaining = {"count": len(ragged)}

    def one_gone() -> None:
        remaining["count"] -= 1
        if remaining["count"] == 0:
            masks.release()

    for cache in ragged:
        weakref.finalize(cache, one_gone)


# -- attaching a press ----------------------------------------------------------------------------------------------
@contextmanager
def _sink_aware_scorers() -> Iterator[None]:
    """kvpress's query-scoring functions that count attention sinks when they score through an AttentionView."""
    _SinkPatch.depth += 1
    if _SinkPatch.depth == 1:
        ExpectedAttentionPress.score = _expected_attention_score
        SnapKVPress.compute_window_attention = staticmethod(_window_attention)
    try:
        yield
    finally:
        _SinkPatch.depth -= 1
        if _SinkPatch.depth == 0:
            ExpectedAttentionPress.score = _ORIGINAL_EXPECTED_ATTENTION_SCORE
            SnapKVPress.compute_window_attention = _ORIGINAL_WINDOW_ATTENTION


class _SinkPatch:
    depth = 0


def make_views(anatomy: MoEAnatomy) -> dict[int, AttentionView]:
    """An :class:`AttentionView` of every compressible layer's attention module."""
    rotary_emb = getattr(anatomy.language_model, "rotary_emb", None)
    views = {}
    for layer_idx in anatomy.compressible_layers:
        module = anatomy.attention(layer_idx)
        views[layer_idx] = AttentionView(module, AttentionLayout(module, anatomy.family, anatomy.config), rotary_emb)
    return views


class _CacheWatch:
    """Forward pre-hook on the language model that notes the caches a press compresses."""

    def __init__(self, caches: list):
        self.caches = caches

    def __call__(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and not any(c is cache for c in self.caches):
            self.caches.append(cache)


@contextmanager
def press_scope(press: BasePress, model: nn.Module, anatomy: MoEAnatomy | None) -> Iterator[list]:
    """Everything a MoE-aware press needs around its hooks, shared by the live path (:func:`attach`) and the prefill
    replay: the support check and ``post_init_from_model`` (MoE families; kvpress's own ``__call__`` does the latter
    for other models), sink-aware scorers for families with attention sinks, and the mask fitting for ragged caches.

    Yields a list: append the caches the press compresses; on a clean exit, a ragged one keeps the mask fitting alive
    until it is garbage-collected, and otherwise nothing is left on the model.
    """
    if anatomy is not None:
        check_press_supported(press, anatomy)
        press.post_init_from_model(model)
    masks = _RaggedMasks.acquire(model)
    caches: list = []
    ok = False
    try:
        with _sink_aware_scorers() if anatomy is not None and anatomy.family.sinks_attr else nullcontext():
            yield caches
        ok = True
    finally:
        if ok:
            _keep_masks_while_alive(masks, caches)
        else:
            masks.release()


@contextmanager
def attach(press: BasePress, model: nn.Module) -> Iterator[MoEAnatomy | None]:
    """Run ``press`` MoE-aware on ``model`` inside the block: the MoE-aware hooks for known MoE families, kvpress's
    own ``__call__`` for dense models and unknown families (with the ragged-mask fitting in both cases). Yields the
    anatomy, or ``None`` when kvpress's own hooks are used. Every hook is removed on exit, also when the block raises,
    except the mask fitting that a ragged cache left behind needs (see the module docstring)."""
    anatomy = moe_anatomy_for_press(model)
    with press_scope(press, model, anatomy) as caches:
        handles = []
        try:
            language_model = language_model_of(model)
        except ValueError:
            language_model = None
        if language_model is not None:
            handles.append(language_model.register_forward_pre_hook(_CacheWatch(caches), with_kwargs=True))
        routed = None
        try:
            if anatomy is None:
                with _ORIGINAL_CALL(press, model):
                    yield None
            else:
                views = make_views(anatomy)
                if needs_routing(press):
                    routed = _RoutedHooks(press, anatomy, views)
                    routed.register(handles)
                else:
                    for view in views.values():
                        handles.append(view.module.register_forward_hook(press_hook(press, view), with_kwargs=True))
                yield anatomy
        finally:
            for handle in handles:
                handle.remove()
            if routed is not None:
                routed.close()


@contextmanager
def _moe_aware_call(self: BasePress, model: nn.Module) -> Iterator[None]:
    """``BasePress.__call__``, MoE-aware."""
    with attach(self, model):
        yield


class _MoEAwareBase(BasePress):
    """Base of the classes :func:`MoEAware` creates: ``BasePress.__call__`` replaced by the MoE-aware one, so that a
    press's own ``__call__`` (DecodingPress's reset, Finch's embedding hook) still runs around it."""

    __call__ = _moe_aware_call


_MOE_AWARE_TYPES: dict[type, type] = {}


def _guarded_call(original_call):
    """``__call__`` of a press that runs its own forward passes: refused on MoE families, its own elsewhere."""

    @contextmanager
    def call(self: BasePress, model: nn.Module) -> Iterator[None]:
        anatomy = moe_anatomy_for_press(model)
        if anatomy is not None:
            check_press_supported(self, anatomy)
        with original_call(self, model):
            yield

    call.__pikv_original__ = original_call
    return call


def _moe_aware_type(cls: type) -> type:
    sub = _MOE_AWARE_TYPES.get(cls)
    if sub is None:
        namespace: dict[str, Any] = {"__module__": cls.__module__}
        if cls is kvpress.KVzipPress:  # its own forward passes, made MoE-correct (pikv_press.kvzip)
            from pikv_press.kvzip import moe_kvzip_call

            namespace["__call__"] = moe_kvzip_call
        elif issubclass(cls, _OWN_CALL_CLASSES):
            namespace["__call__"] = _guarded_call(cls.__call__)
        sub = type(f"MoEAware{cls.__name__}", (cls, _MoEAwareBase), namespace)
        _MOE_AWARE_TYPES[cls] = sub
    return sub


def MoEAware(press: BasePress) -> BasePress:  # noqa: N802  (reads as a kvpress wrapper)
    """A copy of ``press`` that runs MoE-aware: ``pipe(..., press=MoEAware(SnapKVPress(0.5)))``.

    The copy's class derives from the press's own class (``isinstance(MoEAware(p), type(p))``), so kvpress's
    pipeline treats decoding presses as such; its ``press(model)`` attaches the MoE-aware hooks of this module. Inner
    presses are shared with ``press``. Presses of pikv-press are MoE-aware already and are returned as they are.
    """
    if not isinstance(press, BasePress):
        raise TypeError(f"MoEAware wraps a kvpress press (a BasePress), got {type(press).__name__}.")
    if is_moe_aware(press):
        return press
    wrapped = copy.copy(press)
    wrapped.__class__ = _moe_aware_type(type(press))
    return wrapped


def is_moe_aware(press: BasePress) -> bool:
    """Whether ``press(model)`` attaches the MoE-aware hooks (MoEAware copies, pikv-press presses, or any press while
    :func:`kvpress_moe_support` or :func:`install` is on)."""
    return isinstance(press, _MoEAwareBase) or BasePress.__call__ is _moe_aware_call


class _Switch:
    depth = 0
    installed = False


_ORIGINAL_OWN_CALLS = {cls: cls.__dict__["__call__"] for cls in _OWN_CALL_CLASSES if "__call__" in cls.__dict__}


def _set_global(on: bool) -> None:
    BasePress.__call__ = _moe_aware_call if on else _ORIGINAL_CALL
    for cls, original in _ORIGINAL_OWN_CALLS.items():
        if not on:
            cls.__call__ = original
        elif cls is kvpress.KVzipPress:  # MoE-correct, as under MoEAware (pikv_press.kvzip)
            from pikv_press.kvzip import moe_kvzip_call

            cls.__call__ = moe_kvzip_call
        else:
            cls.__call__ = _guarded_call(original)


def original_kvpress_call(cls: type):
    """kvpress's own ``cls.__call__`` for a press that runs its own forward passes, whatever switch is on."""
    return _ORIGINAL_OWN_CALLS[cls]


@contextmanager
def kvpress_moe_support() -> Iterator[None]:
    """Every kvpress press used inside the block is MoE-aware (as if wrapped with :func:`MoEAware`); kvpress is
    restored on exit. Decoding from a ragged cache inside the block works too."""
    _Switch.depth += 1
    _set_global(True)
    try:
        yield
    finally:
        _Switch.depth -= 1
        if _Switch.depth == 0 and not _Switch.installed:
            _set_global(False)


def install() -> None:
    """Make every kvpress press MoE-aware for the rest of the process (idempotent); undo with :func:`uninstall`.
    Prefer :func:`MoEAware` or :func:`kvpress_moe_support`, which leave the rest of the process alone."""
    _Switch.installed = True
    _set_global(True)
    logger.debug("pikv-press: kvpress presses are now MoE-aware process-wide")


def uninstall() -> None:
    """Restore kvpress's own ``BasePress.__call__`` (inside a :func:`kvpress_moe_support` block, at its end)."""
    _Switch.installed = False
    if _Switch.depth == 0:
        _set_global(False)


def is_installed() -> bool:
    return _Switch.installed


def _expected_attention_score(self, module, hidden_states, keys, values, attentions, kwargs):
    """``ExpectedAttentionPress.score`` with attention sinks counted in the softmax (GPT-OSS).

    A sink adds ``exp(sink_h)`` to head ``h``'s softmax denominator, so a head that parks attention on its sink
    gives every key less weight; without it, the heads of a group would be averaged on the wrong scale.
    """
    sinks = module.attention_sinks if isinstance(module, AttentionView) else None
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
    sinks = module.attention_sinks if isinstance(module, AttentionView) else None
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
        ours = _window_attention(view, kwargs["hidden_states"], keys, window, rope)
        errors.append((ours - output[1][..., -window:, :-window]).abs().max().item())

    handles = [anatomy.attention(i).register_forward_hook(hook, with_kwargs=True) for i in anatomy.compressible_layers]
    try:
        with torch.no_grad():
            anatomy.language_model(input_ids=input_ids, past_key_values=DynamicCache())
    finally:
        for handle in handles:
            handle.remove()
    return errors


