"""``PiKVPress``: pikv-press's default press, one ``compression_ratio`` knob."""

from __future__ import annotations

from kvpress import AdaKVPress, ExpectedAttentionPress

from pikv_press.attention import headwise
from pikv_press.compat import _MoEAwareBase
from pikv_press.presses.base import check_batch_size_one, check_ratio


class PiKVPress(_MoEAwareBase, AdaKVPress):
    """The default press: ExpectedAttention scores (kvpress's ``ExpectedAttentionPress``: the attention that future
    queries, modelled as a Gaussian fitted to the context's queries (all but the first 4) and rotated to future
    positions, are expected to pay each key, times the value's norm; the first 4 tokens kept) under AdaKV's head-wise
    budgets (arXiv 2407.11550: the tokens to drop are chosen across all kv heads of a layer at once, each head keeping
    at least 20% of its share), made MoE-correct (:mod:`pikv_press.compat`). **No routing feature is part of it:
    routing did not help** in the ablations below. ``PiKVPress(r)`` keeps exactly what
    ``MoEAware(AdaKVPress(ExpectedAttentionPress(r, epsilon=1e-2)))`` keeps (``"expected_attention"`` in
    :mod:`evaluation.registry`), with argument checks.

    **Where the bytes go.** AdaKV gives kv heads different numbers of tokens. A transformers ``DynamicCache`` holds
    the same number per head, so there (as with kvpress's ``AdaKVPress``) the evicted keys are *masked* in
    attention (``module.masked_key_indices``), which is exactly eviction for the answers, and no bytes are freed.
    With ``attn_implementation="sdpa"`` the mask is exact (:mod:`pikv_press.attention.headwise`: a per-head
    ``-inf`` mask, where kvpress's patch searches for a fake key that can fail with "Could not find fake keys").
    :class:`~pikv_press.cache.ExpertShardedCache` stores each head's rows ragged and frees them (``cache_nbytes``
    falls by the ratio). For a press that shrinks a ``DynamicCache`` or a packed cache in place, use
    ``MoEAware(TOVAPress(r))`` (what this press was before the second ablation) or another uniform-budget press.

    **Why this press.** The four-ratio ablation (``measurements/routing_ablation/ablation.md``, command in the
    README: RULER-1k on the embedded model ``smollm2-moe-ed1da41ac4``, teacher-forced, the six tasks the full cache
    can solve, 20 samples per task, full cache 51.7) pairs each press with TOVA: ExpectedAttention + AdaKV scores
    43.8 / 40.2 / 22.1 / 2.5 at 0.25 / 0.5 / 0.75 / 0.875 against TOVA's 49.4 / 31.7 / 9.2 / 0.8 (+8.5 [+1.5,
    +15.4] at 0.5, +12.9 [+5.8, +19.8] at 0.75, -5.6 [-11.0, -0.8] at 0.25). It also led TOVA at 0.5 in ``make
    demo`` (RULER-1k, 32 samples: 53.1 vs 43.8), on the sparse-routing variant (45 samples: 60.0 vs 46.7) and on
    the needle grid (``python -m evaluation.needle_heatmap``: 4/15 vs 1/15). It is **not the best press
    everywhere**: StreamingLLM leads at 0.875 (14.6, +13.8 [+8.3, +19.4] over TOVA; 22.7 at 0.75) and on the
    needle grid (9/15 at 0.5); at 0.75 this press collapses on the sparse-routing variant (2.2 against
    StreamingLLM's 31.1) and on the needle grid (0/15); on the RULER-4k headline (129 contexts, all 13 tasks, full
    cache 20.3) it scores 19.5 / 10.8 / 2.3 at 0.25 / 0.5 / 0.75 and TOVA beats it at 0.5 (+7.8 [+3.1, +12.5]) and
    0.75 (+8.8 [+5.0, +12.7]): the choice was made at 1k and does not hold at 4k on this model. Without AdaKV's
    head-wise budgets ExpectedAttention collapses (6.0 at 0.5): the head-wise budget is what works. Its replay costs
    about 24% of the prefill on a CPU at 1k tokens and 10% at 4k (TOVA: 2-3%), above the 5% goal.

    **Routing.** Every routing feature was measured on top of a base scorer (the README's "Routing-aware presses"):
    none is a reliable gain on the default model (novelty on TOVA +2.1 to +5.8 at the four ratios, but on this
    press's composition -10.0 at 0.5 and -18.5 at 0.75; expert-balanced TOVA -13.1 at 0.5, +7.5 at 0.75); on the
    sparse-routing variant (8 of 64 experts) expert-balanced TOVA was +17.8 [+4.4, +31.1] at 0.75 on 45 samples,
    almost all on one task: a hint, not a result.

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1) (averaged over kv heads in each layer).
    alpha_safeguard : share of its budget that every kv head keeps, in [0, 1] (AdaKV's safeguard).
    epsilon : ExpectedAttention's small constant added to every score (1e-2, as the registry's baseline).
    """

    def __init__(self, compression_ratio: float = 0.0, alpha_safeguard: float = 0.2, epsilon: float = 1e-2):
        check_ratio(self, compression_ratio)
        if not isinstance(alpha_safeguard, (int, float)) or not 0.0 <= alpha_safeguard <= 1.0:
            raise ValueError(f"PiKVPress: alpha_safeguard must be in [0, 1] (the share of its budget every kv head "
                             f"keeps), got {alpha_safeguard!r}.")
        if not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(f"PiKVPress: epsilon must be a number >= 0, got {epsilon!r}.")
        super().__init__(press=ExpectedAttentionPress(compression_ratio=float(compression_ratio),
                                                      epsilon=float(epsilon)),
                         alpha_safeguard=float(alpha_safeguard))

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        check_ratio(self, value)
        self.press.compression_ratio = value

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        check_batch_size_one(self, keys)
        headwise.mark(module)  # masks applied exactly in SDPA, not by kvpress's fake-key search
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)
