"""Fast checks of the MoEfication (evaluation.embedded_model) on a tiny random Llama; real-model checks are slow."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from evaluation.embedded_model.moefy import (
    MoEficationRecipe,
    MoEfiedMLP,
    balanced_kmeans,
    build_glm4moe,
    expert_output_norms,
    install_reference_moe,
    mlp_weights,
    moefy,
    neuron_activations,
    router_logits,
    topk_mask,
)

VOCAB = 256
RECIPE = MoEficationRecipe(num_experts=8, top_k=2, shared_neurons=64, cluster_tokens=512, router_steps=100)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def token_ids(seed: int, batch: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense():
    return tiny_llama()


@pytest.fixture(scope="module")
def splits(dense):
    return moefy(dense, token_ids(1), RECIPE, seed=0, progress=False)


@pytest.fixture(scope="module")
def moe(dense, splits):
    return build_glm4moe(dense, splits, RECIPE)


def test_config_and_shapes(dense, splits, moe):
    config = moe.config
    size = RECIPE.expert_size(dense.config.intermediate_size)
    assert type(moe).__name__ == "Glm4MoeForCausalLM"
    assert config.n_routed_experts == RECIPE.num_experts and config.num_experts_per_tok == RECIPE.top_k
    assert config.moe_intermediate_size == size
    assert config.n_shared_experts * size == RECIPE.shared_neurons
    assert config.first_k_dense_replace == 0 and config.n_group == config.topk_group == 1
    assert config.rope_parameters["partial_rotary_factor"] == 1.0 == config.partial_rotary_factor
    assert config.rope_parameters["rope_theta"] == dense.config.rope_parameters["rope_theta"]
    assert config.routed_scaling_factor == RECIPE.top_k and config.norm_topk_prob
    assert config.tie_word_embeddings == dense.config.tie_word_embeddings
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    hidden = dense.config.hidden_size
    for layer, split in zip(moe.model.layers, splits, strict=True):
        mlp = layer.mlp
        assert mlp.experts.gate_up_proj.shape == (RECIPE.num_experts, 2 * size, hidden)
        assert mlp.experts.down_proj.shape == (RECIPE.num_experts, hidden, size)
        assert mlp.shared_experts.gate_proj.weight.shape == (RECIPE.shared_neurons, hidden)
        assert mlp.gate.weight.shape == (RECIPE.num_experts, hidden)
        # every FFN neuron lands in exactly one place: shared block or one expert (no copies of the FFN)
        neurons = torch.cat([split.shared_idx, split.expert_idx.flatten()]).sort().values
        assert torch.equal(neurons, torch.arange(dense.config.intermediate_size))
    assert not any(p.is_meta for p in moe.parameters()) and not any(b.is_meta for b in moe.buffers())


def test_balanced_kmeans_equal_sizes():
    features = torch.randn(96, 20, generator=torch.Generator().manual_seed(0))
    labels = balanced_kmeans(features, 6, iters=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels.bincount(minlength=6), torch.full((6,), 16))


def test_deterministic_given_seed(dense, moe):
    again = build_glm4moe(dense, moefy(dense, token_ids(1), RECIPE, seed=0, progress=False), RECIPE)
    first, second = moe.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_all_experts_reproduce_dense_ffn(dense, splits):
    recipe = MoEficationRecipe(**{**RECIPE.__dict__, "top_k": RECIPE.num_experts})
    full = build_glm4moe(dense, splits, recipe)
    for layer in full.model.layers:  # a zero gate makes every sigmoid exactly 0.5, so every expert weight exactly 1
        layer.mlp.gate.weight.data.zero_()
    x = torch.randn(5, 7, dense.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for moe_layer, dense_layer in zip(full.model.layers, dense.model.layers, strict=True):
            torch.testing.assert_close(moe_layer.mlp(x), dense_layer.mlp(x), rtol=1e-5, atol=1e-6)
        ids = token_ids(3, batch=2, length=32)
        torch.testing.assert_close(full(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


def test_glm4moe_matches_reference_moe(dense, splits, moe):
    """The exported Glm4Moe routes like the in-memory reference (same experts, weight ~1 per selected expert).

    Tokens whose k-th and (k+1)-th router logits lie within 1e-3 of the logit bound are near-ties that the container's
    float32 sigmoid at 0.5 +- 1e-3 cannot order (documented in the README); every other token must match exactly.
    """
    x = torch.randn(64, dense.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for layer, split, moe_layer in zip(dense.model.layers, splits, moe.model.layers, strict=True):
            reference = MoEfiedMLP(layer.mlp, split, RECIPE.top_k, "router")
            chosen, weights = moe_layer.mlp.route_tokens_to_experts(moe_layer.mlp.gate(x))
            logits = router_logits(x, split.router_weight, split.router_bias)
            expected = topk_mask(logits, RECIPE.top_k)
            got = torch.zeros_like(expected).scatter_(-1, chosen, True)
            top = logits.topk(RECIPE.top_k + 1, dim=-1).values
            clear = top[:, -2] - top[:, -1] > 1e-3 * split.logit_bound
            assert clear.float().mean() > 0.9
            assert torch.equal(got[clear], expected[clear])
            torch.testing.assert_close(weights, torch.ones_like(weights), rtol=0, atol=10 * RECIPE.gate_logit_scale)
            torch.testing.assert_close(moe_layer.mlp(x)[clear], reference(x)[clear], rtol=1e-2, atol=1e-4)
    ref_model = copy.deepcopy(dense)
    install_reference_moe(ref_model, splits, RECIPE.top_k)
    ids = token_ids(5, batch=2, length=32)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref_model(ids).logits, rtol=1e-2, atol=1e-3)


def test_saved_model_reloads_identically(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(moe)
    assert reloaded.config.rope_parameters["partial_rotary_factor"] == 1.0
    ids = token_ids(6, batch=2, length=48)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, moe(ids).logits, rtol=0, atol=1e-6)


def test_router_recall_above_chance(dense, splits):
    """On held-out tokens the router's top-k overlaps the activation oracle's top-k more than chance (k / E)."""
    from evaluation.embedded_model.moefy import attention_block

    ids = token_ids(7, batch=4, length=64)
    hidden = dense.model.embed_tokens(ids)
    layer, split = dense.model.layers[0], splits[0]
    with torch.no_grad():
        x = layer.post_attention_layernorm(attention_block(dense, layer, hidden, 4)).reshape(-1, hidden.shape[-1])
        gate, up, down = mlp_weights(layer.mlp)
        oracle = topk_mask(expert_output_norms(neuron_activations(x, gate, up), down, split.expert_idx), RECIPE.top_k)
        chosen = topk_mask(router_logits(x, split.router_weight, split.router_bias), RECIPE.top_k)
    recall = float((chosen & oracle).sum() / oracle.sum())
    chance = RECIPE.top_k / RECIPE.num_experts
    assert recall > chance + 0.1, (recall, chance)


@pytest.mark.slow
def test_real_model_two_layer_fit_and_build(tmp_path):
    """Fit the real SmolLM2 recipe on 2 layers into an artifact and build from it: the build verifies every tensor's
    hash against the fit's manifest, and the saved Glm4Moe equals the in-memory reference MoE."""
    from transformers import AutoModelForCausalLM

    from evaluation.embedded_model.artifact import read_artifact
    from evaluation.embedded_model.build import RECIPE as REAL
    from evaluation.embedded_model.build import build, load_dense
    from evaluation.embedded_model.fit import fit

    artifacts = tmp_path / "artifacts"
    name = fit(seed=0, num_layers=2, directory=artifacts)
    path = build(tmp_path / "moe", artifact=name, directory=artifacts)
    moe = AutoModelForCausalLM.from_pretrained(path).eval()
    dense, tokenizer = load_dense(num_layers=2)
    layers, recipe, _ = read_artifact(name, artifacts)
    reference = copy.deepcopy(dense)
    install_reference_moe(reference, [layer.fitted_split(recipe.gate_logit_scale) for layer in layers], REAL.top_k)
    text = "Mixture-of-experts layers route every token to a few experts. " + "Routing is discrete, so a near-tie "
    text += "between two experts may resolve differently in the two implementations; compare losses, not logits."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = moe(ids).logits[0, :-1], reference(ids).logits[0, :-1]
    loss_a = torch.nn.functional.cross_entropy(a, ids[0, 1:])
    loss_b = torch.nn.functional.cross_entropy(b, ids[0, 1:])
    assert abs(float(loss_a - loss_b)) <= 1e-2 * float(loss_b)
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9


def test_reference_stats_and_random_grouping(dense, splits):
    from evaluation.embedded_model.quality import random_grouping, routing_stats

    shuffled = random_grouping(splits, seed=0)
    for split, other in zip(splits, shuffled, strict=True):
        assert torch.equal(split.shared_idx, other.shared_idx)
        assert torch.equal(split.expert_idx.flatten().sort().values, other.expert_idx.flatten().sort().values)
        assert not torch.equal(split.expert_idx, other.expert_idx)
    model = copy.deepcopy(dense)
    modules = install_reference_moe(model, splits, RECIPE.top_k, "router")
    for module in modules:
        module.stats = {}
    with torch.no_grad():
        model(token_ids(8, batch=2, length=32))
    stats = routing_stats(modules, dense.config.intermediate_size)
    size = RECIPE.expert_size(dense.config.intermediate_size)
    expected_active = (RECIPE.shared_neurons + RECIPE.top_k * size) / dense.config.intermediate_size
    assert stats["active_neuron_share"] == pytest.approx(expected_active)
    assert 0 <= stats["router_recall_mean"] <= 1 and stats["expert_load_max_over_uniform_mean"] >= 1


def test_masked_output_is_shared_block_plus_selected_experts(dense, splits):
    """What moefy passes upward: shared neurons plus the selected experts' neurons, each expert summed with weight 1."""
    from evaluation.embedded_model.moefy import masked_output, neuron_owners

    layer, split = dense.model.layers[1], splits[1]
    gate, up, down = mlp_weights(layer.mlp)
    x = torch.randn(9, dense.config.hidden_size, generator=torch.Generator().manual_seed(8))
    acts = neuron_activations(x, gate, up)
    selected = topk_mask(router_logits(x, split.router_weight, split.router_bias), RECIPE.top_k)
    out, mask = masked_output(acts, selected, neuron_owners(split, acts.shape[1]), down)
    expected = acts[:, split.shared_idx] @ down[:, split.shared_idx].T
    for e, idx in enumerate(split.expert_idx):
        expected = expected + selected[:, e : e + 1] * (acts[:, idx] @ down[:, idx].T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    size = RECIPE.expert_size(acts.shape[1])
    assert torch.equal(mask.sum(1), torch.full((9,), RECIPE.shared_neurons + RECIPE.top_k * size))
    with torch.no_grad():
        torch.testing.assert_close(MoEfiedMLP(layer.mlp, split, RECIPE.top_k, "router")(x), out)


def test_default_recipe_ships_its_calibration_ids():
    """The real fit reads the committed calibration ids: no generation, same tokens on every machine."""
    import importlib

    fit_module = importlib.import_module("evaluation.embedded_model.fit")  # the module, not its function `fit`
    key = fit_module.calibration_key(fit_module.RECIPE, 0)
    path = fit_module.shipped_calibration_path(key)
    assert path.exists(), f"{path} missing: run python -m evaluation.embedded_model.fit --export-calibration"
    # model and tokenizer are only needed to generate: None proves the shipped file is used
    ids = fit_module.calibration_ids(None, None, fit_module.RECIPE, 0)
    recipe = fit_module.RECIPE
    assert ids.dtype == torch.long
    assert ids.shape == (recipe.calibration_tokens // recipe.calibration_seq_len, recipe.calibration_seq_len)
    assert 0 <= int(ids.min()) and int(ids.max()) < 49152  # SmolLM2's vocabulary
    assert len(ids.unique()) > 3000  # real text (4123 distinct tokens), not padding
    wrong = MoEficationRecipe(**{**recipe.__dict__, "calibration_tokens": 2048})
    with pytest.raises(ValueError, match="shape"):
        fit_module.load_calibration_ids(path, wrong)


def test_router_logit_scale_restores_the_fitted_router(dense, splits, moe, tmp_path):
    """config.router_logit_scale, declared to the anatomy by the embedded model's loader, turns the flat stored gate
    back into the fitted router."""
    from pikv_press.moe import get_anatomy

    moe.save_pretrained(tmp_path)
    anatomy = get_anatomy(_reload_with_scale(tmp_path))
    x = torch.randn(16, dense.config.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for i, split in enumerate(splits):
            scale = anatomy.router_logit_scale(i)
            assert scale == pytest.approx(split.gate_scale(RECIPE.gate_logit_scale))
            gate = anatomy.router(i)
            stored = gate(x).float()
            assert float(stored.abs().max()) < 0.01  # flat as stored ...
            restored = (stored + 4 * gate.e_score_correction_bias) / scale
            fitted = router_logits(x, split.router_weight, split.router_bias)
            torch.testing.assert_close(restored, fitted, rtol=1e-4, atol=1e-4)  # ... sharp once rescaled


def _reload_with_scale(path):
    """What the embedded model's loader does: from_pretrained, then declare the gate's scale to the anatomy."""
    from transformers import AutoModelForCausalLM

    from pikv_press.moe import set_router_logit_scale

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    set_router_logit_scale(model, model.config.router_logit_scale)
    return model


def test_router_logit_scale_defaults_and_checks():
    from pikv_press.moe import get_anatomy, set_router_logit_scale
    from pikv_press.testing import build_model

    model = build_model("qwen3_moe")
    model.config.router_logit_scale = [2.0, 2.0, 2.0]  # a config key alone changes nothing in the core anatomy
    assert get_anatomy(model).router_logit_scale(1) == 1.0
    set_router_logit_scale(model, [1.0, 2.0, 3.0])
    assert get_anatomy(model).router_logit_scale(2) == 3.0
    with pytest.raises(ValueError, match="one factor per decoder layer"):
        set_router_logit_scale(model, [1.0])
    with pytest.raises(ValueError, match="positive"):
        set_router_logit_scale(model, [1.0, 0.0, 1.0])
    set_router_logit_scale(model, None)
    assert get_anatomy(model).router_logit_scale(2) == 1.0


def test_margin_weights_cost_near_ties_little():
    from evaluation.embedded_model.moefy import margin_weights

    norms = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 5.0]])
    # boundary: midpoint of the 2nd and 3rd largest norms (2.5, then 1.0); divided by the mean norm (2.5, then 2.0)
    expected = torch.tensor([[0.6, 0.2, 0.2, 0.6], [0.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(margin_weights(norms, 2), expected)


def test_weighted_router_fit_follows_its_weights():
    """Fitted with weights, the router reaches a lower weighted loss than the plain fit (the weights are used)."""
    import torch.nn.functional as F

    from evaluation.embedded_model.moefy import fit_router

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    targets = (x @ torch.randn(8, 4, generator=g) + torch.randn(512, 4, generator=g) > 0).float()
    weights = torch.rand(512, 4, generator=g) ** 4

    def weighted_loss(w, b):
        return float(F.binary_cross_entropy_with_logits(router_logits(x, w, b), targets, weight=weights))

    plain = weighted_loss(*fit_router(x, targets, steps=100, l2=0.0))
    weighted = weighted_loss(*fit_router(x, targets, steps=100, l2=0.0, weights=weights))
    assert weighted < plain - 1e-3, (weighted, plain)


def test_recipe_rejects_unknown_router_weighting():
    with pytest.raises(ValueError, match="router_weighting"):
        MoEficationRecipe(router_weighting="softmax")


def test_expert_output_norms_equal_the_norms_of_the_expert_outputs():
    g = torch.Generator().manual_seed(0)
    acts, down = torch.randn(50, 24, generator=g), torch.randn(16, 24, generator=g)
    expert_idx = torch.randperm(24, generator=g)[:18].reshape(3, 6)
    direct = torch.stack([(acts[:, idx] @ down[:, idx].T).norm(dim=-1) for idx in expert_idx], dim=-1)
    torch.testing.assert_close(expert_output_norms(acts, down, expert_idx), direct, rtol=1e-5, atol=1e-6)


def test_quality_table_compares_bf16_with_bf16():
    from evaluation.embedded_model.quality import BF16_DENSE, BF16_MOE, markdown

    stats = dict.fromkeys(
        ["active_neuron_share", "router_recall_mean", "router_recall_min_layer", "router_recall_max_layer",
         "expert_load_max_over_uniform_mean", "expert_load_max_over_uniform_worst_layer", "expert_load_cv_mean"], 0.5
    )
    report = {
        "model_dir": "m", "recipe_fingerprint": "f", "ppl_windows": 4, "seq_len": 1024, "chance_recall": 0.5,
        "routing_stats_essays": stats, "seconds": 1.0, "command": "cmd",
        "perplexity": {
            "dense": {"essays": 20.0, "squad": 10.0},
            "MoE (saved Glm4Moe, router)": {"essays": 30.0, "squad": 20.0},
            BF16_DENSE: {"essays": 25.0, "squad": 10.0},
            BF16_MOE: {"essays": 30.0, "squad": 25.0},
        },
    }
    md = markdown(report)
    assert "| MoE (saved Glm4Moe, router) | 30.00 | 1.500 | 20.00 | 2.000 |" in md
    assert f"| {BF16_MOE} | 30.00 | 1.200 | 25.00 | 2.500 |" in md


def test_router_study_fits_on_some_tokens_and_tests_on_the_others(dense):
    from evaluation.embedded_model.router_study import markdown, study_layer

    x = torch.randn(300, dense.config.hidden_size, generator=torch.Generator().manual_seed(8))
    mlp = dense.model.layers[0].mlp
    every = study_layer(mlp, x, 200, "8:8:cluster:none", base=RECIPE)  # all experts on: the dense FFN
    assert every["oracle_error"] < 1e-10 and every["router_error"] < 1e-10 and every["router_recall"] == 1.0
    rows = [{"layer": 0, "config": c, **study_layer(mlp, x, 200, c, base=RECIPE)}
            for c in ("8:2:cluster:margin", "8:2:param:none", "8:2:random:none", "6:2:cluster:none:32")]
    for row in rows:
        assert 0 < row["oracle_error"] <= row["router_error"] + 0.05 and 0 <= row["router_recall"] <= 1
    assert [r["expert_size"] for r in rows] == [8, 8, 8, 16] and rows[-1]["active_share"] == (32 + 32) / 128
    md = markdown({"rows": rows, "fit_tokens": 200, "test_tokens": 100, "seconds": 1.0, "command": "c"})
    assert "| 0 | 64 + 8 x 8, top-2 | 62% | param | none |" in md
    with pytest.raises(ValueError, match="equal experts"):
        study_layer(mlp, x, 200, "7:2:cluster:none", base=RECIPE)


def test_embedded_model_loads_with_dense_masked_experts(moe, tmp_path):
    """load_embedded_model runs the experts dense-masked (same outputs to rounding); dense_masked=False keeps eager."""

    from evaluation.embedded_model.build import META_FILENAME, load_embedded_model
    from pikv_press.moe import DENSE_MASKED
    from pikv_press.testing import build_tokenizer

    moe.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    (tmp_path / META_FILENAME).write_text(json.dumps({"artifact": "smollm2-moe-test"}))
    fast, _ = load_embedded_model(tmp_path, build_if_missing=False)
    plain, _ = load_embedded_model(tmp_path, build_if_missing=False, dense_masked=False)
    assert fast.config._experts_implementation == DENSE_MASKED
    assert plain.config._experts_implementation != DENSE_MASKED
    from pikv_press.moe import get_anatomy

    scales = fast.config.router_logit_scale  # the loader declares the stored gate's scale to the anatomy
    assert [get_anatomy(fast).router_logit_scale(i) for i in range(len(scales))] == scales != [1.0] * len(scales)
    plain.set_experts_implementation("eager")
    ids = token_ids(6, batch=2, length=48)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="embedded_model.build"):
        load_embedded_model(tmp_path / "missing", build_if_missing=False)


def test_artifact_round_trip_assembles_the_same_bits(dense, splits, moe, tmp_path):
    """An artifact written from fitted splits reads back to the same indices and gate, is named after its hash (the
    same bytes every time), and assembles, by indexing alone, the model build_glm4moe builds, bit for bit."""
    from evaluation.embedded_model.artifact import (
        PREFIX,
        file_sha256,
        read_artifact,
        state_dict_sha256,
        write_artifact,
    )
    from evaluation.embedded_model.moefy import assemble_glm4moe, glm4moe_layer

    layers = [glm4moe_layer(split, RECIPE.gate_logit_scale) for split in splits]
    name = write_artifact(layers, RECIPE, 0, tmp_path)
    path = tmp_path / f"{name}.safetensors"
    assert name == PREFIX + file_sha256(path)[:10]
    assert write_artifact(layers, RECIPE, 0, tmp_path / "again") == name
    expected = state_dict_sha256(moe)
    (tmp_path / f"{name}.json").write_text(json.dumps({"artifact_sha256": file_sha256(path), "tensors": expected}))
    read, recipe, seed = read_artifact(name, tmp_path)
    assert recipe == RECIPE and seed == 0
    for layer, back, split in zip(layers, read, splits, strict=True):
        assert back.shared_idx.dtype == back.expert_idx.dtype == torch.int16
        assert torch.equal(back.shared_idx.long(), split.shared_idx)
        assert torch.equal(back.expert_idx.long(), split.expert_idx)
        assert torch.equal(back.gate_weight, layer.gate_weight) and torch.equal(back.gate_bias, layer.gate_bias)
        assert back.router_logit_scale == layer.router_logit_scale
        fitted = back.fitted_split(RECIPE.gate_logit_scale)  # the router unscaled again, to float32 rounding
        torch.testing.assert_close(fitted.router_weight, split.router_weight, rtol=1e-6, atol=0)
        assert fitted.logit_bound == pytest.approx(split.logit_bound)
    assembled = assemble_glm4moe(dense.config, dense.state_dict(), read, recipe)
    assert state_dict_sha256(assembled) == expected
    assert assembled.config.router_logit_scale == moe.config.router_logit_scale


def test_artifact_errors_say_what_to_do(dense, splits, moe, tmp_path):
    from evaluation.embedded_model.artifact import file_sha256, read_artifact, state_dict_sha256, write_artifact
    from evaluation.embedded_model.build import check_hashes
    from evaluation.embedded_model.moefy import glm4moe_layer

    with pytest.raises(FileNotFoundError, match="evaluation.embedded_model.fit"):
        read_artifact("smollm2-moe-0000000000", tmp_path)
    name = write_artifact([glm4moe_layer(s, RECIPE.gate_logit_scale) for s in splits], RECIPE, 0, tmp_path)
    path = tmp_path / f"{name}.safetensors"
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_artifact(name, tmp_path)
    hashes = state_dict_sha256(moe)
    (tmp_path / f"{name}.json").write_text(json.dumps({"artifact_sha256": file_sha256(path), "tensors": hashes}))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        read_artifact(name, tmp_path)
    check_hashes(moe, {"artifact": name, "tensors": hashes})
    wrong = dict(hashes, **{"model.norm.weight": "0" * 64})
    with pytest.raises(RuntimeError, match=r"in 1 of .*model\.norm\.weight.*evaluation\.embedded_model\.fit"):
        check_hashes(moe, {"artifact": name, "tensors": wrong})
