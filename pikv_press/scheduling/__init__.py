"""Decode-time scheduling: fixed KV budgets while a model generates or reads a long input.

Policies (kvpress ``ScorerPress``es that keep the cache in arrival order, one per file):

- :class:`H2OPolicy`: accumulated attention plus a recent window (arXiv 2306.14048).
- :class:`StreamingLLMPolicy`: attention sinks plus a recent window (arXiv 2309.17453; original rotary positions).
- :class:`LRUPolicy` / :class:`LFUPolicy`: least recently / least frequently *accessed* (attention above a threshold).
- :class:`ExpertAwarePolicy`: evicts from the experts most over-represented in the cache (routing recorded with
  :class:`~pikv_press.moe.RoutingRecorder`; pikv-press's own rule).
- :func:`quest_attention`: Quest-style page selection (arXiv 2406.10774): every page kept, each query reads its top
  pages by per-page key bounds (an attention switch, not an eviction policy).

Running them:

- :class:`DecodingPolicyPress`: kvpress's ``DecodingPress`` (MoE-aware) that also gathers the attention statistics the
  policies need, inside the attention computation (:func:`track`; no eager attention forced on the model).
- :func:`chunked_prefill`: bounded-memory prefill, the cache compressed to a budget after every chunk.
"""

from pikv_press.scheduling.attention import attention_probabilities, attention_step, override_attention, track
from pikv_press.scheduling.base import AttentionStatsPolicy, OrderedScorerPress
from pikv_press.scheduling.decoding import DecodingPolicyPress
from pikv_press.scheduling.expert_aware import ExpertAwarePolicy
from pikv_press.scheduling.h2o import H2OPolicy
from pikv_press.scheduling.lfu import LFUPolicy
from pikv_press.scheduling.lru import LRUPolicy
from pikv_press.scheduling.prefill import ChunkedPrefill, chunked_prefill
from pikv_press.scheduling.quest import page_bounds, page_criticality, quest_attention, selected_slots
from pikv_press.scheduling.state import AttentionStep, LayerState
from pikv_press.scheduling.streaming_llm import StreamingLLMPolicy

__all__ = [
    "AttentionStatsPolicy",
    "AttentionStep",
    "ChunkedPrefill",
    "DecodingPolicyPress",
    "ExpertAwarePolicy",
    "H2OPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "LayerState",
    "OrderedScorerPress",
    "StreamingLLMPolicy",
    "attention_probabilities",
    "attention_step",
    "chunked_prefill",
    "override_attention",
    "page_bounds",
    "page_criticality",
    "quest_attention",
    "selected_slots",
    "track",
]
