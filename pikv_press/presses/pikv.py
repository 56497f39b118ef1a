"""``PiKVPress``: pikv-press's default press, one ``compression_ratio`` knob."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import TOVAPress

from pikv_press.compat import _MoEAwareBase
from pikv_press.presses.base import check_batch_size_one, check_ratio


@dataclass
class PiKVPress(_MoEAwareBase, TOVAPress):
    """The default press. Today it is TOVA (arXiv 2401.06104: keep the tokens the last context token attends to
    most, averaged over heads), made MoE-correct (:mod:`pikv_press.compat`): **routing did not help** in the first
    ablation, so no routing feature is part of it.

    The ablation (``python -m evaluation.routing_ablation``; RULER-1k, embedded model ``smollm2-moe-ed1da41ac4``,
    teacher-forced scoring; first table on all 9 retrieval tasks x 1 sample, pooled table on niah_single_1,
    niah_single_2 and qa_1, the tasks the model solves with the full cache) put each routing feature on top of TOVA.
    At ratio 0.5 all three made the gold answer less likely than TOVA alone (paired gold-NLL differences with 95%
    intervals above 0 for :class:`ExpertBalancedPress`, :class:`RouterAffinityPress` and
    :class:`RoutingNoveltyPress`); at 0.75 none was better than TOVA beyond noise (RouterAffinityPress was worse).
    TOVA was the best kvpress baseline at 0.5; StreamingLLM scored higher at 0.75 on the same few samples. The
    figures, with sample counts and intervals, are in the closing note of the issue and in
    ``results/routing_ablation/ablation.md`` written by that command. Routing predicted from the attention input was
    not an option on that model: it matches the experts' actual top-1 for 11% of the tokens and recalls 57% of the
    top-32 (chance: 50%).

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    """

    def __post_init__(self):
        check_ratio(self, self.compression_ratio)
        super().__post_init__()

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        check_batch_size_one(self, keys)
        return super().score(module, hidden_states, keys, values, attentions, kwargs)
