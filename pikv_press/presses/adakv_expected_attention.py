"""``AdaKVExpectedAttentionPress``: ExpectedAttention under AdaKV's head-wise budgets, made MoE-correct, with exact
head-wise masks."""

from __future__ import annotations

from kvpress import AdaKVPress, ExpectedAttentionPress

from pikv_press.attention import headwise
from pikv_press.compat import _MoEAwareBase
from pikv_press.presses.base import check_batch_size_one, check_ratio


class AdaKVExpectedAttentionPress(_MoEAwareBase, AdaKVPress):
    """ExpectedAttention scores (kvpress's ``ExpectedAttentionPress``: the attention that future queries, modelled as
    a Gaussian fitted to the context's queries (all but the first 4) and rotated to future positions, are expected
    to pay each key, times the value's norm; the first 4 tokens kept) under AdaKV's head-wise budgets (arXiv
    2407.11550: the tokens to drop are chosen across all kv heads of a layer at once, each head keeping at least 20%
    of its share), made MoE-correct (:mod:`pikv_press.compat`). It keeps exactly what
    ``MoEAware(AdaKVPress(ExpectedAttentionPress(r, epsilon=1e-2)))`` keeps (``"expected_attention"`` in
    :mod:`evaluation.registry`), with argument checks and exact masks. It was :class:`~pikv_press.PiKVPress` from
    the four-ratio RULER-1k ablation until the RULER-4k headline and the 2k measurement showed its lead does not
    hold at longer contexts (figures in ``PiKVPress``'s docstring and the README).

    **Where the bytes go.** AdaKV gives kv heads different numbers of tokens. A transformers ``DynamicCache`` holds
    the same number per head, so there (as with kvpress's ``AdaKVPress``) the evicted keys are *masked* in
    attention (``module.masked_key_indices``), which is exactly eviction for the answers, and no bytes are freed.
    With ``attn_implementation="sdpa"`` the mask is exact (:mod:`pikv_press.attention.headwise`: a per-head
    ``-inf`` mask, where kvpress's patch searches for a fake key that can fail with "Could not find fake keys").
    :class:`~pikv_press.cache.ExpertShardedCache` stores each head's rows ragged and frees them (``cache_nbytes``
    falls by the ratio).

    **Measured** (embedded model ``smollm2-moe-ed1da41ac4``, teacher-forced, paired 95% intervals): on the four-ratio
    RULER-1k ablation (six tasks, 120 samples) 43.8 / 40.2 / 22.1 / 2.5 at 0.25 / 0.5 / 0.75 / 0.875 against TOVA's
    49.4 / 31.7 / 9.2 / 0.8 (+8.5 [+1.5, +15.4] at 0.5, +12.9 [+5.8, +19.8] at 0.75); on the RULER-4k headline (130
    contexts, 13 tasks) 19.5 / 10.8 / 2.3 at 0.25 / 0.5 / 0.75, where TOVA beats it at 0.5 and 0.75. Without AdaKV's
    head-wise budgets ExpectedAttention collapses (6.0 at 0.5 at 1k). Its replay costs about 24% of the prefill on a
    CPU at 1k tokens and 10% at 4k (TOVA: 2-3%).

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1) (averaged over kv heads in each layer).
    alpha_safeguard : share of its budget that every kv head keeps, in [0, 1] (AdaKV's safeguard).
    epsilon : ExpectedAttention's small constant added to every score (1e-2, as the registry's baseline).
    """

    def __init__(self, compression_ratio: float = 0.0, alpha_safeguard: float = 0.2, epsilon: float = 1e-2):
        check_ratio(self, compression_ratio)
        if not isinstance(alpha_safeguard, (int, float)) or not 0.0 <= alpha_safeguard <= 1.0:
            raise ValueError(f"AdaKVExpectedAttentionPress: alpha_safeguard must be in [0, 1] (the share of its budget "
                             f"every kv head keeps), got {alpha_safeguard!r}.")
        if not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(f"AdaKVExpectedAttentionPress: epsilon must be a number >= 0, got {epsilon!r}.")
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
        keys, values = super().compress(module, hidden_states, keys, values, attentions, kwargs)
        headwise.move_masks(module, keys.device)  # kvpress builds the batch indices on the CPU
        return keys, values
