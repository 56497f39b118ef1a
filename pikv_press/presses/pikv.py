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

    The ablation (``python -m evaluation.routing_ablation --tasks niah_single_1,niah_single_2,qa_1 --first_chunk 1
    --chunks 9 --pool_with <its 9-task chunk 0>``; RULER-1k, embedded model ``smollm2-moe-ed1da41ac4``,
    teacher-forced; 27 samples, 9 per task, on the retrieval tasks that the model solves with the full cache, which
    scores 74.1 [63.0, 85.2]) put each routing feature on top of TOVA (paired differences to TOVA, 95% intervals):

    * ratio 0.5, TOVA 63.0 [48.1, 77.8]: :class:`ExpertBalancedPress` -25.9 [-37.0, -14.8] (gold NLL +0.89
      [+0.53, +1.24]), :class:`RouterAffinityPress` -33.3 [-51.9, -14.8] (NLL +1.63 [+0.84, +2.66]),
      :class:`RoutingNoveltyPress` -3.7 [-11.1, 0.0] (NLL +0.02 [-0.35, +0.34]);
    * ratio 0.75, TOVA 25.9 [11.1, 40.7]: ExpertBalancedPress +7.4 [-7.4, +22.2] (NLL -0.39 [-0.92, +0.13]),
      RoutingNoveltyPress +7.4 [-7.4, +22.2] (NLL +0.64 [-0.16, +1.53]), RouterAffinityPress -22.2 [-37.0, -7.4].

    Two features hurt at 0.5 and nothing beat TOVA beyond noise at 0.75. TOVA is not the best kvpress press
    everywhere either: on needle-in-a-haystack contexts (``python -m evaluation.needle_heatmap``: Paul Graham essays,
    1k/2k/4k tokens x 5 depths, one sample per cell, teacher-forced) the full cache writes the needle 15/15, and at
    ratio 0.5 StreamingLLM 9/15, ExpectedAttention 4/15 and this press 1/15 (at 0.75: 3, 0 and 1 of 15); on RULER-1k
    (``make demo``, 32 samples at 0.5) ExpectedAttention with AdaKV led (53.1) ahead of TOVA (43.8) and StreamingLLM
    (34.4), with overlapping intervals. No single kvpress scorer leads on both haystacks, so this press has not been
    switched to another on this evidence. Among kvpress baselines TOVA led at 0.5
    (StreamingLLM 48.1, SnapKV 33.3, Knorm 33.3); at 0.75 StreamingLLM's 37.0 was +11.1 [-7.4, +29.6] over TOVA, within
    noise. Routing predicted from the attention input was not an option on that model: it matches the experts'
    actual top-1 for 11% of the tokens and recalls 57% of the top-32 (chance: 50%).

    The second ablation (``measurements/routing_ablation/ablation.md``, command in the README; RULER-1k, six tasks x 6
    samples, ratios 0.25/0.5/0.75/0.875, full cache 54.9) confirms it: no routing feature beats its base scorer
    beyond noise at any ratio (expert-balanced TOVA -11.1 [-19.4, -2.8] at 0.5), predicted routing is no worse
    than the layer's own. This press (TOVA) scores 52.1 / 33.3 / 13.9 / 2.8 at the four ratios; ExpectedAttention
    with AdaKV's head-wise budgets leads at 0.5 and 0.75 (+13.2 [+4.2, +22.9] and +12.5 [+0.7, +24.3]) but only
    masks evicted keys in a DynamicCache (no bytes freed; ragged in ``ExpertShardedCache``), and StreamingLLM leads
    at 0.875 (+13.2 [+4.2, +22.9]). Its replay costs 3.1% of the prefill.

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
