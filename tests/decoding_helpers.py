"""Helpers shared by the cache tests: reproducible token ids and the logits of a prefill plus greedy decoding."""

from __future__ import annotations

import torch


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    """``(1, n)`` random token ids of the tiny vocabulary (above the special tokens)."""
    return torch.randint(5, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, cache, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of the last prefill position and of ``steps`` greedy decoding steps, ``(steps + 1, vocab)``; the cache
    grows by ``ids`` and the decoded tokens."""
    with torch.no_grad():
        out = model(ids, past_key_values=cache)
        logits = [out.logits[0, -1]]
        for _ in range(steps):
            out = model(logits[-1].argmax().view(1, 1), past_key_values=cache)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)
