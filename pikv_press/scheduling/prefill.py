"""Bounded-memory prefill: a long input read in chunks, the cache compressed to a budget between chunks.

kvpress compresses a prompt after prefilling it whole, so the cache (and the attention) grows with the context
before it shrinks. :func:`chunked_prefill` reads the input ``chunk_size`` tokens at a time through the model with a
:class:`~pikv_press.scheduling.decoding.DecodingPolicyPress` (``compression_interval=1``, ``target_size=budget``):
each layer is compressed to ``budget`` tokens right after its attention has read the new chunk, so no layer ever
holds more than ``budget + chunk_size`` tokens and the whole cache at most ``layers x budget + chunk_size`` tokens,
whatever the context length. Tokens keep their rotary positions in the stream (position ids are passed
explicitly), as with every kvpress press.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, DecodingPress, ScorerPress
from torch import nn
from transformers import Cache

from pikv_press.cache import cache_nbytes, make_cache
from pikv_press.compat import MoEAware, ragged_cache_masks
from pikv_press.moe import language_model_of
from pikv_press.scheduling.attention import stats_policies, track
from pikv_press.scheduling.decoding import DecodingPolicyPress


@dataclass
class ChunkedPrefill:
    """What :func:`chunked_prefill` returns.

    ``cache``: the compressed cache (continue decoding from it with ``position_ids`` starting at ``tokens``);
    ``tokens``: tokens read; ``peak_kv_bytes``: the largest :func:`~pikv_press.cache.cache_nbytes` seen after any
    layer's cache update (before its compression), i.e. the peak KV storage of the prefill;
    ``kv_bytes``: ``(tokens read, cache bytes after the chunk, peak bytes so far)`` after each chunk;
    ``last_logits``: logits of the last chunk's last token ``(batch, vocab)`` when ``logits`` was requested.
    """

    cache: Cache
    tokens: int
    peak_kv_bytes: int
    kv_bytes: list[tuple[int, int, int]] = field(default_factory=list)
    last_logits: torch.Tensor | None = None


def _press_for(policy: BasePress | None, budget: int | None) -> BasePress | None:
    if budget is None:
        if policy is not None:
            raise ValueError("chunked_prefill got a policy but no budget: pass budget=<tokens per layer>.")
        return None
    if isinstance(policy, DecodingPress):
        if policy.target_size != budget or policy.compression_interval != 1:
            raise ValueError(f"chunked_prefill compresses after every chunk to the budget: the DecodingPress needs "
                             f"compression_interval=1 and target_size={budget}, got {policy.compression_interval} and "
                             f"{policy.target_size}.")
        return MoEAware(policy)
    if not isinstance(policy, ScorerPress):
        raise TypeError(f"chunked_prefill takes a scorer press as policy (H2OPolicy, KnormPress, ...) or a kvpress "
                        f"DecodingPress, got {type(policy).__name__}.")
    return DecodingPolicyPress(base_press=policy, compression_interval=1, target_size=budget,
                               hidden_states_buffer_size=0)


@torch.no_grad()
def chunked_prefill(model: nn.Module, input_ids: torch.Tensor, budget: int | None, chunk_size: int,
                    policy: BasePress | None = None, *, cache: Cache | None = None,
                    on_logits: Callable[[int, torch.Tensor], None] | None = None,
                    logits: bool = False) -> ChunkedPrefill:
    """Prefill ``input_ids`` (1, tokens) in chunks of ``chunk_size``, compressing every layer to ``budget`` tokens
    with ``policy`` as each chunk is read (see the module docstring).

    Parameters
    ----------
    model : a causal LM (``model.model`` is run when no logits are needed).
    input_ids : (1, tokens) int64; one sequence.
    budget : tokens kept per layer, >= 1; ``None``: no compression (a plain prefill in chunks, the full cache).
    chunk_size : tokens per forward pass, 1 <= chunk_size <= budget.
    policy : a scorer (:class:`~pikv_press.scheduling.H2OPolicy`, ..., or any kvpress ``ScorerPress``) run through
        :class:`~pikv_press.scheduling.DecodingPolicyPress`, or a kvpress ``DecodingPress`` with
        ``compression_interval=1`` and ``target_size=budget`` (used as it is, made MoE-aware).
    cache : the cache to fill (default a new ``DynamicCache``); it must be empty.
    on_logits : called as ``on_logits(start, logits)`` with each chunk's logits ``(1, chunk, vocab)`` (needs the LM
        head; for streaming perplexity).
    logits : keep the last token's logits in the result.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                 torch.int32):
        raise ValueError("chunked_prefill needs input_ids of shape (1, tokens), integer dtype.")
    if input_ids.shape[0] != 1:
        raise ValueError(f"chunked_prefill reads one sequence at a time, got a batch of {input_ids.shape[0]}.")
    if input_ids.shape[1] == 0:
        raise ValueError("chunked_prefill got no tokens.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
    if budget is not None:
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1 (tokens per layer) or None, got {budget!r}.")
        if chunk_size > budget:
            raise ValueError(f"chunk_size ({chunk_size}) must not exceed the budget ({budget}): the first chunk is a "
                             "prefill, which kvpress's DecodingPress leaves uncompressed. Use smaller chunks.")
    if budget is not None and policy is None:
        raise ValueError("chunked_prefill needs a policy to compress with (H2OPolicy(), KnormPress(), ...).")
    press = _press_for(policy, budget)
    cache = make_cache("dynamic") if cache is None else cache
    if cache.get_seq_length() != 0:
        raise ValueError("chunked_prefill fills an empty cache; pass a new one (or none).")
    language_model = language_model_of(model)
    need_head = on_logits is not None or logits
    runner = model if need_head else language_model
    result = ChunkedPrefill(cache=cache, tokens=0, peak_kv_bytes=0)

    def note_peak(module, args, kwargs, output):  # runs before the press's hook: the layer is not compressed yet
        if kwargs.get("past_key_values") is cache:
            result.peak_kv_bytes = max(result.peak_kv_bytes, cache_nbytes(cache))

    handles = [layer.self_attn.register_forward_hook(note_peak, with_kwargs=True) for layer in language_model.layers]
    try:
        with ExitStack() as stack:
            if press is not None and not isinstance(press, DecodingPolicyPress):  # a kvpress DecodingPress given
                for inner in stats_policies((press,)):
                    inner.reset()
                stack.enter_context(track(model, press))  # its base may be a policy that needs statistics
            stack.enter_context(press(model) if press is not None else nullcontext())
            stack.enter_context(ragged_cache_masks(model))
            total = input_ids.shape[1]
            for start in range(0, total, chunk_size):
                stop = min(total, start + chunk_size)
                position_ids = torch.arange(start, stop, device=input_ids.device)[None]
                out = runner(input_ids=input_ids[:, start:stop], past_key_values=cache, position_ids=position_ids,
                             use_cache=True)
                if need_head:
                    if on_logits is not None:
                        on_logits(start, out.logits)
                    if logits and stop == total:
                        result.last_logits = out.logits[:, -1].clone()
                result.tokens = stop
                nbytes = cache_nbytes(cache)
                result.peak_kv_bytes = max(result.peak_kv_bytes, nbytes)
                result.kv_bytes.append((stop, nbytes, result.peak_kv_bytes))
    finally:
        for handle in handles:
            handle.remove()
    return result


