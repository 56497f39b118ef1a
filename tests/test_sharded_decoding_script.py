"""evaluation.sharded_decoding: the decode measurement on a tiny model, and the report on a results file."""

from __future__ import annotations

import json

import pytest
import torch

import pikv_press.attention.sharded  # noqa: F401
from evaluation.sharded_decoding import decode_run, kl, parse_ks, report
from pikv_press.answer import restore_cache, save_cache
from pikv_press.cache.sharded import ExpertShardedCache
from pikv_press.testing import build_model


def test_decode_run_bytes_and_kl():
    model = build_model("olmoe", attn_implementation="pikv_sharded")
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with ExpertShardedCache(model, sink_tokens=1, recent_tokens=2) as cache, torch.no_grad():
        model.model(input_ids=ids[:, :32], past_key_values=cache)
        saved = save_cache(cache)
        tokens = ids[0, 36:].tolist()
        full = decode_run(model, cache, ids[0, 32:36], tokens, 32)
        restore_cache(cache, saved)
        cache.read_top_k = 1
        restricted = decode_run(model, cache, ids[0, 32:36], tokens, 32)
    assert full["logits"].shape == (len(tokens), model.config.vocab_size)
    assert 0 < restricted["kv_bytes_per_step"] < full["kv_bytes_per_step"]
    assert kl(full["logits"], full["logits"]) == pytest.approx(0.0, abs=1e-6)
    assert kl(full["logits"], restricted["logits"]) > 0


def test_parse_ks_and_report(tmp_path):
    assert parse_ks("8,all,32") == [None, 8, 32]
    with pytest.raises(ValueError, match="must include 'all'"):
        parse_ks("8,4")
    rows = []
    for index in range(4):
        for k, exact, nbytes in (("all", True, 1000.0), ("8", index % 2 == 0, 250.0)):
            rows.append({"task": "niah_single_1", "index": index, "cache": "sharded", "k": k, "context_tokens": 900,
                         "kv_bytes_per_step": nbytes, "decode_ms_per_token": 10.0, "decode_cpu_ms_per_token": 9.0,
                         "attention_ms_per_token": 1.0,
                         "kl": 0.0 if k == "all" else 0.1, "tf_exact": exact})
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = report(path)
    assert "| 8 |" in text and "4.00x" in text and "50.0%" in text and "-50.0" in text
