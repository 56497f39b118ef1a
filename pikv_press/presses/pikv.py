"""``PiKVPress``: pikv-press's default press, one ``compression_ratio`` knob."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import TOVAPress

from pikv_press.compat import _MoEAwareBase
from pikv_press.presses.base import check_batch_size_one, check_ratio


@dataclass
class PiKVPress(_MoEAwareBase, TOVAPress):
    """The default press: TOVA (arXiv 2401.06104: keep the tokens that the last context token attends to most,
    averaged over heads) made MoE-correct (:mod:`pikv_press.compat`). ``PiKVPress(r)`` keeps exactly what
    ``MoEAware(TOVAPress(r))`` keeps (``"tova"`` in :mod:`evaluation.registry`), with argument checks. **No routing
    feature is part of it: routing did not help** in the ablations (README, "Routing-aware presses"). Every kv head
    keeps the same tokens, so the evicted keys and values leave any cache (``DynamicCache``, the packed and
    low-rank caches, :class:`~pikv_press.cache.ExpertShardedCache`): the bytes are freed.

    **Why this press** (embedded model ``smollm2-moe-ed1da41ac4``, teacher-forced RULER, paired 95% intervals; the
    commands are in the README). It was chosen at the longest context measured, where KV compression matters:

    * RULER-4k headline (all 13 tasks, 130 contexts, full cache 20.3): TOVA 20.3 / 18.6 / 11.2 at 0.25 / 0.5 /
      0.75, the best of the eight presses at every ratio, ahead of the next beyond noise only at 0.5 (StreamingLLM
      14.6, +4.0 [+0.6, +7.6]; ties at 0.25 with ExpectedAttention + AdaKV 19.5 and at 0.75 with StreamingLLM 8.1,
      +3.1 [-0.8, +6.9]); ExpectedAttention under AdaKV's head-wise budgets (:class:`AdaKVExpectedAttentionPress`,
      the default before) 19.5 / 10.8 / 2.3, so +7.8 [+3.1, +12.5] and +8.8 [+5.0, +12.7] for TOVA at 0.5 and 0.75.
    * RULER-2k (13 tasks, 20 samples each, qa_2 6: 246 contexts, full cache 25.3,
      ``measurements/default_choice_ruler2k/ablation_routing.md``): TOVA 24.8 / 21.3 / 7.3 against
      AdaKV-ExpectedAttention's 23.5 / 18.2 / 5.3 (-1.2 [-3.0, +0.3], -3.0 [-5.8, -0.4], -2.0 [-5.4, +1.2]): the 1k
      lead of AdaKV-ExpectedAttention is gone by 2k.
    * RULER-1k ablation (the six tasks the full cache solves, 120 samples, full cache 51.7): TOVA 49.4 / 31.7 /
      9.2 / 0.8 at 0.25 / 0.5 / 0.75 / 0.875: **there AdaKV-ExpectedAttention leads** at 0.5 (+8.5 [+1.5,
      +15.4]) and 0.75 (+12.9 [+5.8, +19.8]) and StreamingLLM at 0.75-0.875; so does AdaKV-ExpectedAttention on
      ``make demo`` (RULER-1k, 0.5: 53.1 against 43.8) and on the sparse-routing variant at 0.5 (60.0 against
      46.7). On short contexts (1k tokens on this model) prefer :class:`AdaKVExpectedAttentionPress`.
    * Its replay costs 2-3% of the prefill on a CPU (AdaKV-ExpectedAttention: 10-24%), within the 5% goal; on an
      H200 it adds 21-48% to the prefill of random-weight Qwen3-30B-A3B layers at 16k-4k tokens and 6-16% on
      Mixtral-8x7B layers (as kvpress's TOVA and SnapKV through the same hooks), beyond it.
    * Not the most accurate press: KVzip made MoE-correct (``MoEAware(KVzipPress(r))``, :mod:`pikv_press.kvzip`)
      beats it on the 130 RULER-4k headline contexts: 22.0 / 22.8 / 19.3, so +1.7 [-1.1, +4.8] / +4.2 [+0.7, +8.0]
      / +8.2 [+2.9, +13.4] at 0.25 / 0.5 / 0.75, but its context reconstruction takes 4.7 times the prefill's
      time, far beyond the 5% this default allows. Use it where the prefill cost does not matter.
    * :class:`KVzipSurrogatePress` (KVzip's scores predicted by a linear surrogate fitted on news text, KVzip's
      allocation across layers and heads, 2% of the prefill) ties it on the headline: 19.3 / 19.1 / 15.6, so
      -1.0 [-4.5, +2.4] / +0.5 [-3.3, +4.3] / +4.5 [-0.9, +9.7], and leads it on the needle grid (15/15 and 10/15
      against 1/15) and in ``make demo`` (65.6 against 43.8). It is not this press because its evictions differ
      per head, so a ``DynamicCache`` holds more than the ratio says (88 / 68 / 40% of the rows at 0.25 / 0.5 /
      0.75; an ``ExpertShardedCache`` frees every evicted row), its per-layer variant that frees every evicted row
      in any cache (``allocation="layer"``) loses 7-12 points to this press, the prefill holds the full cache until
      its ranking is done, and it needs a surrogate fitted for each model.
    * At 2k (246 contexts, four ratios) the routing-novelty feature on TOVA gains +2.9 [+1.4, +4.6] at 0.875,
      +1.0 [+0.1, +2.1] at 0.25 and ties at 0.5-0.75; at 4k it loses 1.5-2.3 points, so it is not part of this press.
    * Not the best everywhere: on the needle grid (``python -m evaluation.needle_heatmap``) KVzip keeps 14/15
      needles at 0.5 and at 0.75, StreamingLLM 9/15 and 3/15, this press 1/15 at both.

    **Routing.** Every routing feature was measured on top of a base scorer: none is a reliable gain on the default
    model (routing novelty on TOVA +2.1 to +5.8 at the four ratios at 1k and +0.3 to +3.2 at 2k, never below TOVA,
    but -1.5 / -1.5 / -2.3 at 4k on 65 contexts; expert-balanced TOVA -13.1 at 0.5, +7.5 at 0.75 at 1k); on the
    sparse-routing variant (8 of 64 experts) expert-balanced TOVA was +17.8 [+4.4, +31.1] at 0.75 on 45 samples,
    almost all on one task: a hint, not a result.

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    """

    def __setattr__(self, name, value):  # the ratio is checked on construction and on every later change
        if name == "compression_ratio":
            check_ratio(self, value)
        super().__setattr__(name, value)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        check_batch_size_one(self, keys)
        return super().score(module, hidden_states, keys, values, attentions, kwargs)
