"""Held-out comparison of MoEfication choices (expert size, grouping, router loss) layer by layer.

    python -m evaluation.embedded_model.router_study --layers 3,12 --threads 1

The dense SmolLM2's FFN inputs on the shipped calibration ids (32 x 1024 tokens) are split by sequence into fit
tokens (the first 24 sequences) and test tokens (the last 8). For every configuration (experts x top-k with the
recipe's 768-neuron shared block, grouping, router loss weighting), the neuron split and the linear router are fitted
on the fit tokens; on the test tokens the study reports the relative MLP output error
``||moe(x) - dense(x)||^2 / ||dense(x)||^2`` (mean over tokens) with the oracle's top-k and with the fitted router,
and the router's recall of the oracle top-k. Hidden states are the dense model's (not the bottom-up MoE's, as in the
build), so a layer's figures do not depend on the layers below being MoEfied. Writes ``router_study.md`` and
``router_study.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.embedded_model.build import (
    RECIPE,
    command_line,
    load_dense,
    repo_root,
    slice_layers,
    start_command,
    write_report,
)
from evaluation.embedded_model.fit import calibration_key, load_calibration_ids, shipped_calibration_path
from evaluation.embedded_model.moefy import (
    LayerSplit,
    MoEficationRecipe,
    expert_output_norms,
    fit_router,
    masked_output,
    mlp_weights,
    neuron_activations,
    neuron_owners,
    router_logits,
    router_loss_weights,
    split_neurons,
    topk_mask,
)

logger = logging.getLogger(__name__)

FIT_SEQUENCES = 24
DEFAULT_CONFIGS = "16:8:cluster:none,32:16:cluster:none,64:32:cluster:none,64:32:cluster:margin,16:8:param:none"


@torch.no_grad()
def ffn_inputs(dense, layers: Sequence[int], batch_size: int = 4) -> dict[int, torch.Tensor]:
    """[N, H] inputs of each listed layer's FFN for the calibration tokens (dense model, float32).

    Keeps only the layers up to the last one listed in ``dense`` (in place): the ones above are never needed.
    """
    from tqdm.auto import tqdm

    slice_layers(dense, max(layers) + 1)
    ids = load_calibration_ids(shipped_calibration_path(calibration_key(RECIPE, 0)), RECIPE)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [
        dense.model.layers[layer].mlp.register_forward_hook(
            lambda _m, args, _o, layer=layer: captured[layer].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for layer in layers
    ]
    try:
        for start in tqdm(range(0, ids.shape[0], batch_size), desc="dense FFN inputs"):
            dense.model(ids[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(chunks) for layer, chunks in captured.items()}


def relative_error(acts, down, selected, owner, dense_out) -> float:
    out, _ = masked_output(acts, selected, owner, down)
    return float(((out - dense_out).pow(2).sum(-1) / dense_out.pow(2).sum(-1)).mean())


def study_layer(
    mlp, x: torch.Tensor, fit_tokens: int, config: str, seed: int = 0, base: MoEficationRecipe = RECIPE
) -> dict[str, float]:
    """Fit one configuration (``"experts:top_k:grouping:weighting[:shared_neurons]"``) on ``x[:fit_tokens]``, test on
    the rest.  The other hyper-parameters (and the shared block's size when not given) are ``base``'s.
    """
    experts, top_k, grouping, weighting, *shared = config.split(":")
    recipe = dataclasses.replace(
        base,
        num_experts=int(experts),
        top_k=int(top_k),
        router_weighting=weighting,
        shared_neurons=int(shared[0]) if shared else base.shared_neurons,
    )
    recipe.expert_size(mlp.gate_proj.weight.shape[0])  # a clear error for sizes that do not divide
    gate, up, down = mlp_weights(mlp)
    acts = neuron_activations(x, gate, up)
    fit_x, test_x, fit_acts, test_acts = x[:fit_tokens], x[fit_tokens:], acts[:fit_tokens], acts[fit_tokens:]
    shared_idx, expert_idx = split_neurons(fit_acts, down, recipe, torch.Generator().manual_seed(seed), grouping, gate)
    owner = neuron_owners(LayerSplit(shared_idx, expert_idx, torch.empty(0), torch.empty(0)), gate.shape[0])
    fit_norms = expert_output_norms(fit_acts, down, expert_idx)
    weight, bias = fit_router(
        fit_x,
        topk_mask(fit_norms, recipe.top_k),
        recipe.router_steps,
        recipe.router_l2,
        router_loss_weights(fit_norms, recipe),
    )
    oracle = topk_mask(expert_output_norms(test_acts, down, expert_idx), recipe.top_k)
    chosen = topk_mask(router_logits(test_x, weight, bias), recipe.top_k)
    dense_out = test_acts @ down.T
    return {
        "shared_neurons": recipe.shared_neurons,
        "active_share": (recipe.shared_neurons + recipe.top_k * expert_idx.shape[1]) / gate.shape[0],
        "expert_size": expert_idx.shape[1],
        "oracle_error": relative_error(test_acts, down, oracle, owner, dense_out),
        "router_error": relative_error(test_acts, down, chosen, owner, dense_out),
        "router_recall": float((chosen & oracle).sum() / oracle.sum()),
    }


def markdown(result: dict) -> str:
    lines = [
        "| layer | shared + experts x size, top-k | active | grouping | router loss | MLP error, oracle "
        "| MLP error, router | recall |",
        "| ---: | --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        experts, top_k, grouping, weighting, *_ = row["config"].split(":")
        lines.append(
            f"| {row['layer']} | {row['shared_neurons']} + {experts} x {row['expert_size']}, top-{top_k} | "
            f"{row['active_share']:.0%} | {grouping} | {weighting} | "
            f"{row['oracle_error']:.4f} | {row['router_error']:.4f} | {row['router_recall']:.3f} |"
        )
    lines += [
        "",
        f"Fit on {result['fit_tokens']} tokens, tested on {result['test_tokens']}; relative MLP output error "
        "||moe(x) - dense(x)||^2 / ||dense(x)||^2, mean over test tokens.",
        f"Measured in {result['seconds']:.0f} s with `{result['command']}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="3,12", help="comma-separated layer indices")
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma-separated experts:top_k:grouping(cluster|param|random):router_weighting(none|margin)"
        "[:shared_neurons]",
    )
    parser.add_argument("--out", type=Path, default=repo_root() / "results" / "embedded_model" / "router_study")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    start_command(args.threads)
    start = time.perf_counter()
    layers = [int(layer) for layer in args.layers.split(",")]
    configs = args.configs.split(",")
    for config in configs:
        if len(config.split(":")) not in (4, 5):
            parser.error(f"config {config!r} is not experts:top_k:grouping:weighting[:shared_neurons]")
    dense, _ = load_dense()
    inputs = ffn_inputs(dense, layers)
    fit_tokens = FIT_SEQUENCES * RECIPE.calibration_seq_len
    rows = []
    for layer in layers:
        for config in configs:
            row = {"layer": layer, "config": config, **study_layer(dense.model.layers[layer].mlp, inputs[layer],
                                                                     fit_tokens, config)}
            logger.info("%s", row)
            rows.append(row)
    result = {
        "rows": rows,
        "fit_tokens": fit_tokens,
        "test_tokens": inputs[layers[0]].shape[0] - fit_tokens,
        "seconds": time.perf_counter() - start,
        "command": command_line("evaluation.embedded_model.router_study", argv),
    }
    write_report(args.out, "router_study", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
