"""Answering from a compressed cache: greedy decoding as kvpress's pipeline does it, and teacher-forced scoring.

A press compresses the context's cache once; each question is then answered from that cache and the answer is trimmed
off again, so the next question (or the next scoring of the same question) starts from the compressed context::

    with PrefillRecorder(model) as recorder:
        model.model(input_ids=context_ids, past_key_values=DynamicCache())
    cache = recorder.snapshot.replay(SnapKVPress(0.5))
    text = greedy_answer(model, tokenizer, cache, question_ids, context_length, max_new_tokens=32)
    score = teacher_forced_score(model, tokenizer, cache, question_ids, context_length, ["8090293"])

:func:`greedy_answer` gives the same text as ``pipeline("kv-press-text-generation")`` (kvpress's ``generate_answer``
followed by its private ``_remove_answer_from_cache``); ``question_ids`` are the pipeline's (question, chat-template
suffix and answer prefix; see ``pipe.preprocess``) and ``context_length`` is the uncompressed context's token count
(positions continue from it, as in kvpress).

:func:`teacher_forced_score` says whether greedy decoding would produce each gold value, without decoding the whole
answer: one forward pass over the question, a few greedy steps while the model writes something before the value
(``": "`` after RULER's answer prefix, "The special magic number is"), then one forward pass over the value's tokens
(one pass per token on caches that transform what they store, such as low-rank keys, where a pass over several
tokens would let them see each other's untransformed keys). The verdict is exact, not an approximation: a value
counts as recovered only if the argmax equals its token at every position, and the greedy steps before it are the
tokens greedy decoding writes. See :class:`TeacherForcedScore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from pikv_press.compat import ragged_cache_masks

MATCH_MODES = ("all", "any")
# Version of the teacher-forced verdict's rules (lead-in, false starts); results files record it.
TEACHER_FORCING_VERSION = 2
DEFAULT_MAX_LEAD_IN = 8


# -- the cache ------------------------------------------------------------------------------------------------------
def layer_lengths(cache: Cache) -> list[int]:
    """Tokens held by each layer of ``cache`` (layers may differ after a press such as PyramidKV)."""
    return [cache.get_seq_length(idx) for idx in range(len(cache.layers))]


def save_cache(cache: Cache) -> list[dict]:
    """What every layer of ``cache`` holds now, to :func:`restore_cache` after answering from it.

    Layers of dynamic and quantized caches replace their tensors when they grow (concatenation, re-quantization)
    instead of writing into them, so keeping the layers' attributes keeps their contents, whatever the layout.
    """
    for layer in cache.layers:
        if isinstance(layer, StaticLayer):
            raise ValueError("answering from a cache needs layers that grow by concatenation (DynamicCache, "
                             "QuantizedCache or pikv-press's caches); a StaticCache writes in place.")
    return [dict(vars(layer)) for layer in cache.layers]


def restore_cache(cache: Cache, saved: list[dict]) -> None:
    """Put ``cache`` back to the state :func:`save_cache` recorded (what was appended since goes), in place."""
    del cache.layers[len(saved):]
    for layer, state in zip(cache.layers, saved, strict=True):
        layer.__dict__.clear()
        layer.__dict__.update(state)


def _eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def _forward(model: nn.Module, ids: torch.Tensor, cache: Cache, start: int, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits ``(seq or logits_to_keep, vocab)`` of ``ids`` (a 1-D tensor) placed at positions ``start, start+1, ...``
    after ``cache`` (which grows by ``ids``)."""
    device = model.device
    positions = torch.arange(start, start + ids.shape[-1], device=device).unsqueeze(0)
    out = model(input_ids=ids.reshape(1, -1).to(device), past_key_values=cache, position_ids=positions,
                logits_to_keep=logits_to_keep)
    return out.logits[0].float()


def _lossless_on_write(cache: Cache) -> bool:
    """Whether every layer of ``cache`` reads back exactly what was written (transformers' dynamic and static layers):
    then a forward pass over several tokens gives the logits that feeding them one at a time gives. Caches that
    transform what they store (low-rank keys, quantized codes) let tokens of one forward pass see each other's
    untransformed keys, which greedy decoding, one token per step, never does."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer) for layer in cache.layers)


def _force(model: nn.Module, ids: torch.Tensor, cache: Cache, start: int) -> torch.Tensor:
    """Logits ``(seq, vocab)`` of the forced tokens ``ids`` as greedy decoding would compute them: one forward pass
    when the cache is lossless on write, else one token per pass (exact for every cache)."""
    if _lossless_on_write(cache) or ids.shape[-1] == 1:
        return _forward(model, ids, cache, start)
    return torch.cat([_forward(model, ids[i:i + 1], cache, start + i) for i in range(ids.shape[-1])])


# -- greedy answers -------------------------------------------------------------------------------------------------
def greedy_tokens(
    model: nn.Module, cache: Cache, question_ids: torch.Tensor, context_length: int, max_new_tokens: int
) -> list[int]:
    """Greedy answer tokens to ``question_ids`` (``(1, seq)`` or 1-D) from ``cache``, kvpress's ``generate_answer``
    loop: at most ``max_new_tokens`` tokens, ending with the end-of-sequence token if one came. ``cache`` is left
    with the question and answer appended (see :func:`greedy_answer`, which trims them)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    question_ids = question_ids.reshape(-1)
    stop = _eos_ids(model)
    with torch.no_grad(), ragged_cache_masks(model):  # layers may hold different numbers of tokens (PyramidKV)
        logits = _forward(model, question_ids, cache, context_length, logits_to_keep=1)
        position = context_length + question_ids.shape[0]
        generated = [int(logits[-1].argmax())]
        for i in range(max_new_tokens - 1):
            logits = _forward(model, torch.tensor([generated[-1]]), cache, position + i, logits_to_keep=1)
            generated.append(int(logits[-1].argmax()))
            if generated[-1] in stop:
                break
    return generated


def greedy_answer(
    model: nn.Module, tokenizer, cache: Cache, question_ids: torch.Tensor, context_length: int, max_new_tokens: int
) -> str:
    """The greedy answer text (special tokens dropped) to ``question_ids`` from ``cache``; the cache is trimmed back to
    the compressed context afterwards, so several questions can be answered from it in turn."""
    saved = save_cache(cache)
    try:
        tokens = greedy_tokens(model, cache, question_ids, context_length, max_new_tokens)
    finally:
        restore_cache(cache, saved)
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def answer_questions(
    model: nn.Module,
    tokenizer,
    cache: Cache,
    questions_ids: Sequence[torch.Tensor],
    context_length: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to each question from the same compressed ``cache``, as kvpress's pipeline answers
    ``questions=[...]`` (the cache is trimmed back between questions)."""
    return [greedy_answer(model, tokenizer, cache, q, context_length, max_new_tokens) for q in questions_ids]


# -- teacher-forced scoring -----------------------------------------------------------------------------------------
@dataclass
class TeacherForcedScore:
    """What greedy decoding would make of the gold answer, from one teacher-forced pass.

    * ``values``: per gold value (in the order given), whether the argmax equals its token at every position, given
      the greedy lead-in before it and the gold values before it (teacher forcing).
    * ``exact``: whether greedy decoding writes every gold value in order (``match="all"``) or at least one of the
      alternatives (``match="any"``), with at most ``max_lead_in`` greedy tokens before each value and within
      ``max_new_tokens``. Exact: the greedy answer's tokens would be ``lead_in[0] + value 0 + lead_in[1] + ...``.
    * ``share``: ``match="all"``: the share of the values that greedy decoding writes in order before its first miss
      (after a miss greedy decoding leaves the gold path, and what it writes then is unknown without decoding);
      ``match="any"``: 1.0 or 0.0 as ``exact``.
    * ``nll``: mean negative log-likelihood (nats per token) of the gold tokens (``match="any"``: of the most likely
      alternative).
    * ``lead_in``: the greedy text written before each value; ``tokens``: gold tokens scored.
    """

    values: list[bool]
    exact: bool
    share: float
    nll: float
    tokens: int
    lead_in: list[str] = field(default_factory=list)


def value_tokenizations(tokenizer, value: str) -> list[list[int]]:
    """The token sequences by which a generated answer can spell ``value``: the value on its own and after a space
    (``"8090293"`` and ``" 8090293"``), distinct and non-empty, in that order."""
    if not str(value).strip():
        raise ValueError(f"gold value {value!r} has no tokens: give non-empty reference answers.")
    candidates: list[list[int]] = []
    for text in (str(value), " " + str(value).lstrip()):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and ids not in candidates:
            candidates.append(ids)
    return candidates


@dataclass
class _ValueResult:
    hit: bool
    nll_sum: float
    tokens: int
    lead_in: list[int]
    generated: int  # tokens greedy decoding would have written for this value (lead-in + value)
    logits: torch.Tensor  # next-token logits after the value


def _score_value(model, cache: Cache, logits: torch.Tensor, position: int, candidates: list[list[int]],
                 stop: set[int], max_lead_in: int) -> tuple[_ValueResult, int]:
    """Greedy lead-in until the value is written, at most ``max_lead_in`` tokens in: at each greedy token that starts
    a spelling of the value, one forward over that spelling says whether greedy decoding writes all of it; if not (a
    false start, e.g. the ``1`` of a list's ``1.`` before a value starting with 1), greedy decoding has written that
    one token and the search goes on from there."""
    starts: dict[int, list[int]] = {}
    for cand in candidates:
        starts.setdefault(cand[0], cand)
    lead: list[int] = []
    while True:
        token = int(logits.argmax())
        if token in starts:
            chosen = starts[token]
            before = save_cache(cache)
            forced = _force(model, torch.tensor(chosen), cache, position)
            predictions = torch.cat([logits[None], forced[:-1]])  # the logits that predict each gold token
            if bool((predictions.argmax(-1) == torch.tensor(chosen)).all()):
                nll = float(torch.nn.functional.cross_entropy(predictions, torch.tensor(chosen), reduction="sum"))
                result = _ValueResult(True, nll, len(chosen), lead, len(lead) + len(chosen), forced[-1])
                return result, position + len(chosen)
            restore_cache(cache, before)  # a false start: greedy decoding writes this token, then goes its own way
        if token in stop or len(lead) >= max_lead_in:
            break
        logits = _forward(model, torch.tensor([token]), cache, position, logits_to_keep=1)[-1]
        lead.append(token)
        position += 1
    # greedy decoding does not write the value: a miss; force the likeliest spelling for the NLL and what follows
    chosen = max(candidates, key=lambda c: float(logits[c[0]]))
    forced = _force(model, torch.tensor(chosen), cache, position)
    predictions = torch.cat([logits[None], forced[:-1]])
    nll = float(torch.nn.functional.cross_entropy(predictions, torch.tensor(chosen), reduction="sum"))
    return _ValueResult(False, nll, len(chosen), lead, len(lead) + len(chosen), forced[-1]), position + len(chosen)


def teacher_forced_score(
    model: nn.Module,
    tokenizer,
    cache: Cache,
    question_ids: torch.Tensor,
    context_length: int,
    references: Sequence[str],
    *,
    match: str = "all",
    max_new_tokens: int | None = None,
    max_lead_in: int = DEFAULT_MAX_LEAD_IN,
) -> TeacherForcedScore:
    """Score the gold ``references`` after ``question_ids`` from ``cache`` by teacher forcing (see
    :class:`TeacherForcedScore`); the cache is trimmed back to the compressed context afterwards.

    ``match="all"``: the references are values that the answer must list in this order (RULER's niah, vt, cwe, fwe
    tasks, scored by "string match, all"); ``match="any"``: they are alternatives (RULER's qa tasks, "string match,
    part"). Before each value greedy decoding may write up to ``max_lead_in`` tokens that cannot start the value; the
    value is a miss if greedy decoding ends (end-of-sequence token) or runs past ``max_lead_in`` or ``max_new_tokens``
    before it is written. Each value may be spelt on its own or after a space (:func:`value_tokenizations`).
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}.")
    references = [str(r) for r in references]
    if not references:
        raise ValueError("teacher_forced_score needs at least one reference answer.")
    question_ids = question_ids.reshape(-1)
    stop = _eos_ids(model)
    budget = max_new_tokens if max_new_tokens is not None else float("inf")
    saved = save_cache(cache)
    try:
        with torch.no_grad(), ragged_cache_masks(model):
            first = _forward(model, question_ids, cache, context_length, logits_to_keep=1)[-1]
            start = context_length + question_ids.shape[0]
            after_question = save_cache(cache)
            if match == "all":
                results, logits, position, written = [], first, start, 0
                for value in references:
                    result, position = _score_value(model, cache, logits, position,
                                                    value_tokenizations(tokenizer, value), stop, max_lead_in)
                    written += result.generated
                    result.hit = result.hit and written <= budget
                    results.append(result)
                    logits = result.logits
                hits = [r.hit for r in results]
                in_order = next((i for i, hit in enumerate(hits) if not hit), len(hits))
                exact, share = in_order == len(hits), in_order / len(hits)
                nll = sum(r.nll_sum for r in results) / sum(r.tokens for r in results)
                tokens = sum(r.tokens for r in results)
            else:
                results, seen = [], {}
                for value in references:
                    if value in seen:  # alternatives repeat (RULER's qa lists one answer per annotator): same score
                        results.append(seen[value])
                        continue
                    result, _ = _score_value(model, cache, first, start, value_tokenizations(tokenizer, value), stop,
                                             max_lead_in)
                    result.hit = result.hit and result.generated <= budget
                    results.append(result)
                    seen[value] = result
                    restore_cache(cache, after_question)
                hits = [r.hit for r in results]
                exact = any(hits)
                share = float(exact)
                best = min(results, key=lambda r: r.nll_sum / r.tokens)
                nll, tokens = best.nll_sum / best.tokens, sum(r.tokens for r in results)
    finally:
        restore_cache(cache, saved)
    lead_in = [str(tokenizer.decode(r.lead_in, skip_special_tokens=True)) for r in results]
    return TeacherForcedScore(values=hits, exact=exact, share=share, nll=nll, tokens=tokens, lead_in=lead_in)


def greedy_reproduces(
    tokens: Sequence[int], candidates_per_value: Sequence[Sequence[Sequence[int]]], stop: set[int],
    max_lead_in: int = DEFAULT_MAX_LEAD_IN,
) -> list[bool]:
    """Reference for :func:`teacher_forced_score` (``match="all"``) from a decoded greedy answer's ``tokens``: for each
    value in order, whether the answer writes one of its spellings after at most ``max_lead_in`` other tokens (and
    before an end-of-sequence token); values after the first miss are misses. The tests check that teacher forcing
    gives exactly these verdicts."""
    hits: list[bool] = []
    i = 0
    for candidates in candidates_per_value:
        if hits and not hits[-1]:
            hits.append(False)
            continue
        starts: dict[int, Sequence[int]] = {}
        for cand in candidates:
            starts.setdefault(cand[0], cand)
        lead, hit = 0, False
        while i < len(tokens):
            cand = starts.get(tokens[i])
            if cand is not None and list(tokens[i:i + len(cand)]) == list(cand):
                hit, i = True, i + len(cand)
                break
            if tokens[i] in stop or lead >= max_lead_in:
                break
            i, lead = i + 1, lead + 1
        hits.append(hit)
    return hits
