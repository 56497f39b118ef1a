"""``DecodingPolicyPress``: kvpress's ``DecodingPress`` that also gathers the attention statistics its policy needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvpress import DecodingPress
from torch import nn

from pikv_press.compat import _MoEAwareBase
from pikv_press.scheduling.attention import stats_policies, track


@dataclass
class DecodingPolicyPress(DecodingPress, _MoEAwareBase):
    """kvpress's ``DecodingPress`` (compress every ``compression_interval`` decoding steps to ``target_size`` tokens
    per layer, with the scorer ``base_press``), MoE-aware (:mod:`pikv_press.compat`), and with the attention
    statistics of :func:`~pikv_press.scheduling.attention.track` gathered for policies that need them (H2O, LRU,
    LFU, expert-aware). For a kvpress scorer without statistics (``KnormPress``, ...) it is kvpress's
    ``DecodingPress`` made MoE-aware.

    >>> press = DecodingPolicyPress(H2OPolicy(), compression_interval=1, target_size=1024)
    >>> with press(model):
    ...     model.generate(input_ids, max_new_tokens=4096)   # every layer holds at most 1024 + 1 tokens

    kvpress's rules apply: it acts on decoding passes only (a first pass from an empty cache is a prefill and is left
    alone; wrap it in ``PrefillDecodingPress`` to compress the prompt too), and a pass with at least ``target_size``
    new tokens is compressed at once. Policy state is reset on entry and on exit (one sequence per ``with``).

    Parameters: those of kvpress's ``DecodingPress`` (``base_press``, ``compression_interval`` >= 1,
    ``target_size`` >= 1, ``hidden_states_buffer_size``).
    """

    def __post_init__(self):
        for name in ("compression_interval", "target_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodingPolicyPress: {name} must be an integer >= 1, got {value!r}.")
        super().__post_init__()

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        for policy in stats_policies((self,)):
            policy.reset()
        try:
            with track(model, self), super().__call__(model):
                yield
        finally:
            for policy in stats_policies((self,)):
                policy.reset()
