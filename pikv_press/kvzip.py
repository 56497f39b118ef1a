"""KVzip made MoE-correct: the ``__call__`` that :func:`pikv_press.MoEAware` gives kvpress's ``KVzipPress``.

KVzip (Kim et al. 2025, arXiv 2505.23416) rates each cached context token by the largest attention any query of a
*context reconstruction* pass gives it: after the prefill, the model reads "Repeat the previous context exactly." and
the context again, chunk by chunk, on top of the prefilled cache; a token the reconstruction attends to is needed to
reproduce the context, whatever the question. kvpress's ``KVzipPress`` runs those passes through ``model.model`` with
its own attention hooks, which recompute the reconstruction queries with Llama's projections. On MoE families that is
wrong in several ways: QK norms skipped or applied per projection instead of per head (Qwen3-MoE, OLMoE), partial
RoPE rotated over the whole head (GLM-4-MoE), latent attention (DeepSeek) with no ``q_proj``, and logit scales other
than ``1/sqrt(head_dim)`` (Granite-MoE).

Here the same algorithm runs on MoE families through pikv-press's canonical attention views
(:class:`pikv_press.compat.AttentionView`): the queries of the reconstruction are the model's own (norms, scaling,
partial or latent RoPE), the keys are read through the cache-layer interface and put in the same canonical layout,
so ``softmax(q . k)`` over KVzip's key subset (attention sinks, the chunk being reconstructed, the reconstruction
itself) is computed from the model's true attention logits. kvpress's own scoring code (``KVzipPress.prepare``,
``score_kvzip``, ``compress_post``) is used unchanged on those views; what differs is where queries, keys and rotary
tables come from. The reconstruction tokens are cut from the cache after each layer, so the cache afterwards holds the
context only; the evictions are KVzip's non-uniform head-wise and layer-wise budgets, stored as
``module.masked_key_indices`` and applied as an exact mask in SDPA (:mod:`pikv_press.attention.headwise`), as for
AdaKV: the cache keeps the evicted rows in memory (kvpress's own KVzip does the same; it needs SDPA and a
``DynamicCache``, so the expert-sharded cache, which frees masked rows, is not available to it).

Limits (each a clear ``ValueError``): batch size 1 (as kvpress); a ``DynamicCache`` of full-attention layers
(sliding-window layers would drop context tokens during the reconstruction); no attention sinks (GPT-OSS: KVzip's
softmax has no sink term); SDPA attention (the head-wise masks are applied there); the model's tokenizer must be
loadable from ``model.config.name_or_path`` (or set ``press.tokenizer``), for KVzip's chat-template prefix. Dense models
and unknown families run kvpress's own ``KVzipPress.__call__``.

Cost: the reconstruction reads the whole context a second time with a growing cache. kvpress's warning says 2-3
times the prefill; measured on the embedded model at 4k tokens on a CPU, the reconstruction alone took 4.7 times
the prefill's time (``measurements/headline_ruler4k/ablation_kvzip.md``). A recorded prefill
(:class:`pikv_press.prefill.PrefillRecorder`) replays it (:func:`replay`): the reconstruction runs once per record
on a copy of the full cache, and every compression ratio reuses its scores, which do not depend on the ratio.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from kvpress import KVzipPress
from transformers import AutoTokenizer
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from pikv_press.attention import headwise
from pikv_press.cache.layers import layer_access
from pikv_press.moe.families import AttentionKind
from pikv_press.presses.base import check_batch_size_one


def _tokenizer(press: KVzipPress, model: torch.nn.Module):
    tokenizer = getattr(press, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    name = getattr(model.config, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"KVzipPress needs the model's tokenizer for its reconstruction prompt and could not load it from "
            f"model.config.name_or_path={name!r} ({error}). Set press.tokenizer = tokenizer before running it."
        ) from error


def _template(tokenizer) -> tuple[str, str]:
    """KVzip's split of the chat template around the context: (text before it, text after it), as kvpress's."""
    if tokenizer.chat_template is None:
        return "", "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    context, suffix = text.split(separator)
    return context.split(dummy)[0], suffix


def _check_model(anatomy, press: KVzipPress) -> None:
    family = anatomy.family.name
    if press.kvzip_plus_normalization and anatomy.family.attention == AttentionKind.MLA:
        raise ValueError(f"KVzip+ normalisation weighs values by their output projection, which latent attention "
                         f"({family}) does not have per cached value head: use KVzipPress(kvzip_plus_normalization="
                         "False) on this model.")
    if anatomy.family.sinks_attr:
        raise ValueError(f"KVzipPress cannot run MoE-correct on {family}: its attention has sinks, which KVzip's "
                         "score has no term for. Use TOVAPress or SnapKVPress (MoEAware) on this model.")
    if anatomy.sliding_layers:
        raise ValueError(f"KVzipPress cannot run on {family} with sliding-window layers {anatomy.sliding_layers}: "
                         "its reconstruction pass would push context tokens out of those layers' caches.")
    from pikv_press.compat import attention_implementation  # compat imports this module lazily

    attn_impl = attention_implementation(anatomy)
    if attn_impl != "sdpa":
        raise ValueError(f"KVzipPress masks its evictions head-wise inside SDPA attention; this model runs "
                         f"{attn_impl!r} attention: load it with attn_implementation='sdpa'.")


def _check_cache(cache) -> None:
    if cache is None:
        raise ValueError("KVzipPress compresses the cache of the prefill: pass past_key_values=DynamicCache().")
    layers = getattr(cache, "layers", [])
    if any(type(layer) is not DynamicLayer or isinstance(layer, DynamicSlidingWindowLayer) for layer in layers):
        raise ValueError(f"KVzipPress (MoE-correct) needs a DynamicCache of full-attention layers, got "
                         f"{type(cache).__name__} with {sorted({type(layer).__name__ for layer in layers})}.")


def _scoring_hook(press: KVzipPress, view):
    """Forward hook on one attention module during the reconstruction: score the context from the canonical
    queries and keys, then cut the reconstruction tokens from the layer's cache."""
    layout = view.layout

    def hook(module, args, kwargs, output):
        access = layer_access(kwargs["past_key_values"].layers[view.layer_idx])
        keys, values = access.read()
        press_kwargs = dict(kwargs, position_embeddings=layout.canonical_rope(kwargs["position_embeddings"]))
        press.score_kvzip(view, kwargs["hidden_states"], layout.keys_to_canonical(keys),
                          layout.values_to_canonical(values), None, press_kwargs)
        access.write(keys[:, :, : press.context_length], values[:, :, : press.context_length])
        return output

    return hook


def _prepare(press: KVzipPress, tokenizer) -> None:
    """KVzip's chat-template prefix length and question suffix, as kvpress's ``__call__`` sets them."""
    prefix_text, suffix_text = _template(tokenizer)
    press.prefix_length = tokenizer.encode(prefix_text, return_tensors="pt", add_special_tokens=False).shape[-1]
    press._suffix_ids = tokenizer.encode(suffix_text, return_tensors="pt", add_special_tokens=False)


def _scores(press: KVzipPress, anatomy, tokenizer, context_ids: torch.Tensor, cache) -> torch.Tensor:
    """KVzip's score table ``(layers, 1, kv_heads, context)`` from the reconstruction passes on ``cache`` (which holds
    the prefilled context, and holds it again, unchanged, afterwards)."""
    from pikv_press.compat import make_views  # a cycle at import time: compat imports this module lazily

    views = make_views(anatomy)
    kv_heads = {view.layout.num_kv_heads for view in views.values()}
    if len(kv_heads) != 1:
        raise ValueError(f"KVzipPress needs the same number of kv heads in every layer, got {sorted(kv_heads)}.")
    press.context_length = context_ids.shape[1]
    press._context_ids = context_ids
    parameter = next(next(iter(views.values())).module.parameters())
    # kvpress's `prepare` sizes its score table from `model.config`; hand it the canonical numbers.
    shape = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=anatomy.num_layers,
                                                   num_key_value_heads=kv_heads.pop()),
                            dtype=parameter.dtype, device=context_ids.device)
    pairs = press.prepare(shape, tokenizer)
    handles = [view.module.register_forward_hook(_scoring_hook(press, view), with_kwargs=True)
               for view in views.values()]
    try:
        press.start_idx = press.prefix_length
        with torch.no_grad():
            for prefill_ids, repeat_ids in pairs:
                press.end_idx = press.start_idx + prefill_ids.shape[1]
                anatomy.language_model(input_ids=repeat_ids.to(context_ids.device), past_key_values=cache)
                press.start_idx = press.end_idx
    finally:
        for handle in handles:
            handle.remove()
        for view in views.values():  # the cut above is a view: free the reconstruction tokens' storage
            access = layer_access(cache.layers[view.layer_idx])
            keys, values = access.read()
            if any(t.untyped_storage().nbytes() > t.numel() * t.element_size() for t in (keys, values)):
                access.write(keys.clone(), values.clone())
    return press.score_val


def _mask(press: KVzipPress, anatomy, scores: torch.Tensor) -> None:
    """KVzip's evictions for ``press.compression_ratio`` from ``scores``: kvpress's ``compress_post`` (sinks kept,
    non-uniform budgets across layers and heads unless ``layerwise``), applied as exact head-wise masks."""
    press.score_val = scores.clone()  # compress_post raises the sinks' scores in place
    layers = [SimpleNamespace(self_attn=anatomy.attention(i)) for i in range(anatomy.num_layers)]
    press.compress_post(SimpleNamespace(model=SimpleNamespace(layers=layers)))
    for layer in layers:
        headwise.mark(layer.self_attn)  # exact masks in SDPA, not kvpress's fake-key search
        headwise.move_masks(layer.self_attn)  # each layer's masks on its own device


def replay(press: KVzipPress, snapshot) -> None:
    """KVzip on a recorded prefill (:meth:`pikv_press.prefill.PrefillSnapshot.replay`): the reconstruction runs once
    per record and KVzip setting, on a copy of the full cache; every compression ratio reuses its scores. The evictions
    are head-wise masks on the attention modules, so whatever cache the replay returns holds the full context."""
    from pikv_press.compat import check_press_supported, moe_anatomy_for_press

    anatomy = moe_anatomy_for_press(snapshot.model)
    if anatomy is None:
        raise ValueError("KVzipPress replays from a recorded prefill on MoE families only; on this model run it "
                         "with `with press(model): model.model(...)`.")
    check_press_supported(press, anatomy)
    _check_model(anatomy, press)
    if snapshot.input_ids is None:
        raise ValueError("This prefill record has no input_ids (the prefill ran from inputs_embeds); KVzip needs the "
                         "context's token ids to reconstruct it.")
    check_batch_size_one(press, snapshot.input_ids)
    tokenizer = _tokenizer(press, snapshot.model)
    try:
        _prepare(press, tokenizer)
        key = ("kvzip", press.n_sink, press.chunk_size, press.kvzip_plus_normalization, press.prefix_length,
               tuple(press._suffix_ids.flatten().tolist()))
        if key not in snapshot.memo:
            snapshot.memo[key] = _scores(press, anatomy, tokenizer, snapshot.input_ids,
                                         snapshot.full_cache()).detach().clone()
        if press.compression_ratio > 0:
            _mask(press, anatomy, snapshot.memo[key])
    finally:
        press._reset_internal_parameters()


@contextmanager
def moe_kvzip_call(self: KVzipPress, model: torch.nn.Module) -> Iterator[None]:
    """``KVzipPress.__call__`` made MoE-correct (module docstring); kvpress's own on dense and unknown models."""
    from pikv_press.compat import check_press_supported, moe_anatomy_for_press, original_kvpress_call

    anatomy = moe_anatomy_for_press(model)
    if anatomy is None:
        with original_kvpress_call(KVzipPress)(self, model):
            yield
        return
    check_press_supported(self, anatomy)
    _check_model(anatomy, self)
    tokenizer = _tokenizer(self, model)
    _prepare(self, tokenizer)
    seen: dict = {}

    def capture(module, args, kwargs):
        if "ids" not in seen:  # the prefill; later passes in the block (answers) are not the context
            seen["ids"], seen["cache"] = kwargs.get("input_ids"), kwargs.get("past_key_values")

    handle = anatomy.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        try:
            yield
        finally:
            handle.remove()
        ids = seen.get("ids")
        if self.compression_ratio > 0 and ids is not None:
            check_batch_size_one(self, ids)
            _check_cache(seen["cache"])
            _mask(self, anatomy, _scores(self, anatomy, tokenizer, ids, seen["cache"]))
    finally:
        self._reset_internal_parameters()


moe_kvzip_call.__pikv_moe_correct__ = True
