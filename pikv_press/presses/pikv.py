"""``PiKVPress``: pikv-press's default press, one ``compression_ratio`` knob."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpress import ScorerPress, TOVAPress

from pikv_press.presses.expert_balanced import ExpertBalancedPress


@dataclass
class PiKVPress(ExpertBalancedPress):
    """The default press: TOVA's scores (arXiv 2401.06104: the attention of the last context token, averaged over
    heads) kept expert by expert, as :class:`ExpertBalancedPress` does (top-1 grouping by the actual routing, budgets
    proportional to the square root of each expert's group size, at least one token per expert).

    Why this composition (``python -m evaluation.routing_ablation``, RULER-1k, embedded model
    ``smollm2-moe-ed1da41ac4``, teacher-forced): FIGURES. Routing predicted from the attention input is not used: on
    the embedded model it matches the experts' actual top-1 for 11% of the tokens and recalls 57% of the top-32
    (chance: 50%).

    Parameters
    ----------
    compression_ratio : fraction of the cache removed, in [0, 1).
    press, power, min_tokens_per_expert, experts_per_token, routing : as :class:`ExpertBalancedPress`, with TOVA,
        0.5, 1, 1 and ``"actual"`` as defaults.
    """

    press: ScorerPress = field(default_factory=TOVAPress)
