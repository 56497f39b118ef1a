"""MoEfication of a dense SwiGLU decoder (SmolLM2 / Llama) into a GLM-4.5-style MoE (``Glm4MoeForCausalLM``).

Recipe (after Zhang et al., 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"), applied to
every decoder layer, layer by layer on calibration text (each layer is fitted on the hidden states produced by the
already MoEfied layers below it, so routers see the inputs they will see at inference):

1. Neuron activations.  For an FFN ``down(silu(gate x) * up x)`` the activation of neuron ``j`` on token ``x`` is
   ``a_j(x) = silu(g_j . x) * (u_j . x)``; its contribution to the output is ``a_j(x) * down[:, j]``.
2. Shared block.  The ``shared_neurons`` neurons with the largest importance ``mean_x |a_j(x)| * ||down[:, j]||``
   become an always-on shared expert (GLM's ``shared_experts``).
3. Routed experts.  The remaining neurons are split into ``num_experts`` experts of equal size by balanced k-means
   (cosine k-means on each neuron's normalised pattern of ``|a_j(x)| * ||down[:, j]||`` over calibration tokens, with
   the balanced assignment solved exactly as a linear assignment problem), so neurons that fire together share an
   expert.
4. Oracle.  For each token, the oracle top-k experts are those whose output ``||down_E a_E(x)||`` is largest.
5. Router.  A linear router ``x -> W x + b`` (one logit per expert) is fitted by multi-label logistic regression on the
   oracle top-k membership; at inference the top-k logits are selected and each selected expert is added with
   weight 1 (as is the shared block), so a selected expert contributes exactly what its neurons contributed to the
   dense FFN.

Mapping onto ``Glm4MoeMoE``: routed weights there are ``sigmoid(logit)`` normalised over the top-k, times
``routed_scaling_factor``; selection uses ``sigmoid(logit) + e_score_correction_bias``.  The router is stored scaled by
a small factor ``s`` (logits of order ``gate_logit_scale``), so every sigmoid is ``0.5 + s z / 4`` up to a relative
error of about ``gate_logit_scale``; ``routed_scaling_factor = top_k`` makes every selected expert's weight ``1`` up to
that error, and the bias ``s b / 4`` goes into the selection-only ``e_score_correction_bias`` so the top-k order is the
one of ``W x + b``.  Large logits would instead saturate the fp32 sigmoid and break selection by ties.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEficationRecipe:
    """Hyper-parameters of the MoEfication; the build cache is keyed by :meth:`fingerprint`."""

    num_experts: int = 64
    """Routed experts per layer (equal size: routed neurons / num_experts)."""
    top_k: int = 32
    """Routed experts selected per token."""
    shared_neurons: int = 768
    """Neurons of the always-on shared block (a multiple of the expert size)."""
    cluster_tokens: int = 8192
    """Calibration tokens whose activation patterns are clustered."""
    kmeans_iters: int = 25
    """Balanced k-means iterations."""
    router_steps: int = 200
    """L-BFGS iterations of the logistic-regression router."""
    router_l2: float = 1e-4
    """L2 penalty of the router weights (on standardised inputs)."""
    router_weighting: str = "margin"
    """``"margin"``: each (token, expert) term of the router's loss is weighted by how far the expert's output norm
    lies from the top-k boundary (:func:`margin_weights`); ``"none"``: plain logistic regression."""
    gate_logit_scale: float = 1e-3
    """Largest |router logit| stored in the Glm4Moe gate (keeps the sigmoid linear, weights ~1)."""
    calibration: str = "docs+generated"
    """Name of the calibration text mix (see :mod:`evaluation.embedded_model.build`)."""
    calibration_tokens: int = 32768
    """Calibration tokens (in sequences of ``calibration_seq_len``)."""
    calibration_seq_len: int = 1024
    generated_prompts: int = 48
    """Chat prompts answered by the dense model for the ``generated`` calibration source."""
    generated_tokens: int = 320
    """New tokens sampled per prompt."""

    def __post_init__(self) -> None:
        if self.router_weighting not in ("margin", "none"):
            raise ValueError(f"unknown router_weighting {self.router_weighting!r}; choose 'margin' or 'none'")

    def fingerprint(self) -> str:
        """Short stable hash of the recipe (used in cache folder names)."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    def expert_size(self, intermediate_size: int) -> int:
        routed = intermediate_size - self.shared_neurons
        if routed <= 0 or routed % self.num_experts:
            raise ValueError(f"{routed} routed neurons cannot form {self.num_experts} equal experts")
        size = routed // self.num_experts
        if self.shared_neurons % size:
            raise ValueError(f"shared block of {self.shared_neurons} is not a multiple of expert size {size}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError("top_k must lie in [1, num_experts]")
        return size


@dataclass
class LayerSplit:
    """Neuron partition and router of one layer (indices refer to the dense FFN's intermediate neurons)."""

    shared_idx: torch.Tensor  # [S] long
    expert_idx: torch.Tensor  # [E, m] long
    router_weight: torch.Tensor  # [E, H] float32
    router_bias: torch.Tensor  # [E] float32
    logit_bound: float = 1.0  # largest |router logit| on calibration tokens (sets the Glm4Moe gate scale)

    def gate_scale(self, target: float) -> float:
        """Factor that brings the router's calibration logits within ``target`` (see the module docstring)."""
        return target / max(self.logit_bound, 1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# Neuron statistics
# ----------------------------------------------------------------------------------------------------------------------


def mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate [I, H], up [I, H], down [H, I])`` float32 weights of a Llama-style gated MLP."""
    return (
        mlp.gate_proj.weight.detach().float(),
        mlp.up_proj.weight.detach().float(),
        mlp.down_proj.weight.detach().float(),
    )


def neuron_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``a(x) = silu(x gate^T) * (x up^T)``: [N, I] activations of the intermediate neurons for inputs [N, H]."""
    return F.silu(x @ gate.T) * (x @ up.T)


def neuron_importance(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Importance of each neuron: mean |activation| times the norm of its down-projection column."""
    return acts.abs().mean(0) * down.norm(dim=0)


def expert_output_norms(acts: torch.Tensor, down: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """[N, E] norms of each expert's output ``down[:, idx_E] a_idx_E(x)``.

    Computed as ``sqrt(a_E^T G_E a_E)`` with the expert's [m, m] Gram matrix ``G_E = down_E^T down_E``: the same
    quantity as forming each [N, H] expert output, at m / H of the cost.
    """
    a = acts[:, expert_idx]  # [N, E, m]
    d = down[:, expert_idx]  # [H, E, m]
    gram = torch.einsum("hem,hek->emk", d, d)
    return (torch.einsum("nem,emk->nek", a, gram) * a).sum(-1).clamp_min(0).sqrt()


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N, E] mask of the ``k`` largest scores per row."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


# ----------------------------------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------------------------------


def balanced_assignment(similarity: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Assign ``n`` items to ``num_clusters`` clusters of exactly ``n / num_clusters`` items, maximising similarity.

    ``similarity`` is [n, num_clusters]; solved exactly with the Hungarian algorithm on replicated cluster slots.
    """
    from scipy.optimize import linear_sum_assignment

    n = similarity.shape[0]
    size = n // num_clusters
    cost = -similarity.double().repeat_interleave(size, dim=1).numpy()  # [n, n]
    rows, cols = linear_sum_assignment(cost)
    labels = torch.empty(n, dtype=torch.long)
    labels[torch.as_tensor(rows)] = torch.as_tensor(cols) // size
    return labels


def balanced_kmeans(features: torch.Tensor, num_clusters: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Cosine k-means with equal cluster sizes on [n, d] features; returns labels [n] in ``range(num_clusters)``."""
    n = features.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} items cannot form {num_clusters} equal clusters")
    feats = F.normalize(features.float(), dim=-1)
    # k-means++ style seeding (deterministic given the generator)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [feats[first]]
    sim = feats @ centers[0]  # similarity to the nearest center so far
    for _ in range(1, num_clusters):
        dist = (1 - sim).clamp_min(0) + 1e-12
        centers.append(feats[int(torch.multinomial(dist, 1, generator=generator))])
        sim = torch.maximum(sim, feats @ centers[-1])
    centroids = torch.stack(centers)
    labels = balanced_assignment(feats @ centroids.T, num_clusters)
    for _ in range(iters):
        centroids = F.normalize(torch.zeros(num_clusters, feats.shape[1]).index_add_(0, labels, feats), dim=-1)
        new_labels = balanced_assignment(feats @ centroids.T, num_clusters)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def split_neurons(
    acts: torch.Tensor,
    down: torch.Tensor,
    recipe: MoEficationRecipe,
    generator: torch.Generator,
    grouping: str = "cluster",
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shared_idx [S], expert_idx [E, m])`` from calibration activations [N, I] of one layer.

    ``grouping="cluster"`` is the recipe's balanced k-means on activation patterns; ``grouping="param"`` is balanced
    k-means on the routed neurons' gate-projection rows (MoEfication's parameter clustering; needs ``gate``);
    ``grouping="random"`` is a random equal partition of the routed neurons (the ablation baseline).
    """
    num_neurons = acts.shape[1]
    size = recipe.expert_size(num_neurons)
    importance = neuron_importance(acts, down)
    order = importance.argsort(descending=True)
    shared_idx = order[: recipe.shared_neurons].sort().values
    routed = order[recipe.shared_neurons :].sort().values
    if grouping == "cluster":
        tokens = acts.shape[0]
        pick = torch.randperm(tokens, generator=generator)[: min(tokens, recipe.cluster_tokens)]
        pattern = (acts[pick][:, routed].abs() * down[:, routed].norm(dim=0)).T  # [R, T]
        labels = balanced_kmeans(pattern, recipe.num_experts, recipe.kmeans_iters, generator)
    elif grouping == "param":
        if gate is None:
            raise ValueError("grouping='param' clusters the gate-projection rows: pass gate=")
        labels = balanced_kmeans(gate[routed], recipe.num_experts, recipe.kmeans_iters, generator)
    elif grouping == "random":
        labels = torch.randperm(routed.numel(), generator=generator) % recipe.num_experts
    else:
        raise ValueError(f"unknown grouping {grouping!r}")
    expert_idx = torch.stack([routed[labels == e].sort().values for e in range(recipe.num_experts)])
    assert expert_idx.shape == (recipe.num_experts, size)
    return shared_idx, expert_idx


# ----------------------------------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------------------------------


def margin_weights(norms: torch.Tensor, k: int) -> torch.Tensor:
    """[N, E] cost of misrouting each expert: distance of its output norm from the token's top-k boundary.

    The boundary is the midpoint of the k-th and (k+1)-th largest norms; distances are divided by the token's mean
    norm.  An expert far above the boundary is costly to drop, one far below costly to add; near-ties cost little.
    """
    top = norms.topk(min(k + 1, norms.shape[1]), dim=-1).values
    boundary = top[:, k - 1 :].mean(-1, keepdim=True)
    return (norms - boundary).abs() / norms.mean(-1, keepdim=True).clamp_min(1e-12)


def fit_router(
    x: torch.Tensor, targets: torch.Tensor, steps: int, l2: float, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label logistic regression ``sigmoid(W x + b)`` -> ``targets`` ([N, H] inputs, [N, E] 0/1 targets).

    ``weights`` ([N, E], optional) weights each term of the cross-entropy (cost-sensitive fit, see
    :func:`margin_weights`).  Fitted with full-batch L-BFGS on standardised inputs (deterministic), returned in the
    input's original scale.
    """
    x = x.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    y = targets.float()
    num_experts = y.shape[1]
    w = torch.zeros(num_experts, z.shape[1], requires_grad=True)
    b = torch.logit(y.mean(0).clamp(1e-4, 1 - 1e-4)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w.T + b, y, weight=weights) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / std
        bias = b - weight @ mean
    return weight.detach().clone(), bias.detach().clone()


def router_loss_weights(norms: torch.Tensor, recipe: MoEficationRecipe) -> torch.Tensor | None:
    """Per-term weights of the router's loss for the recipe's ``router_weighting`` (``None``: unweighted)."""
    if recipe.router_weighting == "margin":
        return margin_weights(norms, recipe.top_k)
    return None  # "none" (the recipe checks the name)


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.float() @ weight.T + bias


# ----------------------------------------------------------------------------------------------------------------------
# In-memory reference MoE
# ----------------------------------------------------------------------------------------------------------------------


def neuron_owners(split: LayerSplit, num_neurons: int) -> torch.Tensor:
    """[I] expert owning each neuron, -1 for the shared block."""
    owner = torch.full((num_neurons,), -1, dtype=torch.long)
    for e, idx in enumerate(split.expert_idx):
        owner[idx] = e
    return owner


def masked_output(
    acts: torch.Tensor, selected: torch.Tensor, owner: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output [N, H], neuron mask [N, I])`` of the shared block plus the ``selected`` [N, E] experts."""
    keep = torch.cat([selected, torch.ones(acts.shape[0], 1, dtype=torch.bool)], dim=1)  # column -1: shared
    neuron_mask = keep[:, owner]  # owner -1 indexes the last (shared) column
    return (acts * neuron_mask) @ down.T, neuron_mask


class MoEfiedMLP(nn.Module):
    """Reference MoE FFN on top of the dense weights: shared block + top-k routed experts, every expert weight 1.

    ``mode``: ``"router"`` (fitted router), ``"oracle"`` (top-k by expert output norm), ``"dense"`` (all neurons).
    Computes all neuron activations and masks the unselected experts (exact semantics, dense cost).  When
    ``stats`` is a dict, accumulates into it expert selection counts, active-neuron counts and the overlap of the
    selection with the oracle top-k (``oracle_hits`` / ``oracle_selected`` is the router's recall).
    """

    def __init__(self, mlp: nn.Module, split: LayerSplit, top_k: int, mode: str = "router") -> None:
        super().__init__()
        gate, up, down = mlp_weights(mlp)
        self.register_buffer("gate", gate)
        self.register_buffer("up", up)
        self.register_buffer("down", down)
        self.split = split
        self.top_k = top_k
        self.mode = mode
        self.stats: dict[str, torch.Tensor] | None = None
        self.register_buffer("owner", neuron_owners(split, gate.shape[0]))

    def select(self, x: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """[N, E] boolean mask of selected experts."""
        num_experts = self.split.expert_idx.shape[0]
        if self.mode == "dense":
            return torch.ones(x.shape[0], num_experts, dtype=torch.bool)
        if self.mode == "oracle":
            return topk_mask(expert_output_norms(acts, self.down, self.split.expert_idx), self.top_k)
        if self.mode == "router":
            return topk_mask(router_logits(x, self.split.router_weight, self.split.router_bias), self.top_k)
        raise ValueError(f"unknown mode {self.mode!r}")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).float()
        acts = neuron_activations(x, self.gate, self.up)
        selected = self.select(x, acts)
        out, neuron_mask = masked_output(acts, selected, self.owner, self.down)
        if self.stats is not None:
            oracle = topk_mask(expert_output_norms(acts, self.down, self.split.expert_idx), self.top_k)
            for key, value in (
                ("expert_counts", selected.sum(0)),
                ("tokens", x.shape[0]),
                ("active_neurons", neuron_mask.sum()),
                ("oracle_hits", (selected & oracle).sum()),
                ("oracle_selected", oracle.sum()),
            ):
                self.stats[key] = self.stats.get(key, 0) + value
        return out.reshape(shape).to(hidden_states.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Layer-by-layer calibration
# ----------------------------------------------------------------------------------------------------------------------


def _causal_mask(length: int) -> torch.Tensor:
    """Additive [1, 1, T, T] causal mask (valid for eager and sdpa attention)."""
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


@torch.no_grad()
def attention_block(model: nn.Module, layer: nn.Module, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Residual stream after the attention half of a Llama decoder layer, for [B, T, H] inputs (no cache)."""
    out = torch.empty_like(hidden)
    length = hidden.shape[1]
    position_ids = torch.arange(length).unsqueeze(0)
    pos_emb = model.model.rotary_emb(hidden[:1], position_ids)
    mask = _causal_mask(length).to(hidden.dtype)
    for start in range(0, hidden.shape[0], batch_size):
        chunk = hidden[start : start + batch_size]
        attn = layer.self_attn(
            hidden_states=layer.input_layernorm(chunk),
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=pos_emb,
        )[0]
        out[start : start + batch_size] = chunk + attn
    return out


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, so that its reductions do not depend on ``torch.get_num_threads()``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def moefy(
    dense: nn.Module,
    calibration_ids: torch.Tensor,
    recipe: MoEficationRecipe,
    seed: int = 0,
    grouping: str = "cluster",
    batch_size: int = 4,
    progress: bool = True,
    on_layer: Callable[[int, dict[str, float]], None] | None = None,
) -> list[LayerSplit]:
    """Fit the MoEfication of every layer of a Llama-style ``dense`` model on calibration token ids [B, T].

    Layers are processed bottom-up; the hidden states passed upward are those of the MoE built so far.  Returns one
    :class:`LayerSplit` per layer.  ``on_layer(i, metrics)`` receives per-layer calibration metrics (router recall of
    the oracle top-k on calibration tokens, calibration loss).  Deterministic given ``seed``.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    hidden = dense.model.embed_tokens(calibration_ids).float()
    splits: list[LayerSplit] = []
    layers = dense.model.layers
    for i, layer in enumerate(tqdm(layers, desc="MoEfying layers", disable=not progress)):
        mid = attention_block(dense, layer, hidden, batch_size)
        x = layer.post_attention_layernorm(mid).reshape(-1, mid.shape[-1]).float()
        gate, up, down = mlp_weights(layer.mlp)
        acts = neuron_activations(x, gate, up)
        shared_idx, expert_idx = split_neurons(acts, down, recipe, generator, grouping, gate)
        norms = expert_output_norms(acts, down, expert_idx)
        oracle = topk_mask(norms, recipe.top_k)
        weights = router_loss_weights(norms, recipe)
        with single_thread():  # its reductions over tokens would otherwise depend on the thread count
            weight, bias = fit_router(x, oracle, recipe.router_steps, recipe.router_l2, weights)
        logits = router_logits(x, weight, bias)
        split = LayerSplit(shared_idx, expert_idx, weight, bias, float(logits.abs().max()))
        chosen = topk_mask(logits, recipe.top_k)
        recall = float((chosen & oracle).sum() / oracle.sum())
        metrics = {"router_recall_calibration": recall}
        logger.info("layer %d: router recall of oracle top-%d on calibration tokens %.3f", i, recipe.top_k, recall)
        if on_layer is not None:
            on_layer(i, metrics)
        splits.append(split)
        # what MoEfiedMLP(layer.mlp, split, top_k, "router")(x) computes, reusing this layer's activations
        routed, _ = masked_output(acts, chosen, neuron_owners(split, acts.shape[1]), down)
        hidden = mid + routed.reshape(mid.shape)
        del x, acts, mid
    return splits


def install_reference_moe(
    model: nn.Module, splits: Sequence[LayerSplit], top_k: int, mode: str = "router"
) -> list[MoEfiedMLP]:
    """Replace (in place) every layer's MLP of a Llama-style model with a :class:`MoEfiedMLP`; returns them."""
    modules = []
    for layer, split in zip(model.model.layers, splits, strict=True):
        if isinstance(layer.mlp, MoEfiedMLP):
            raise ValueError("model already holds MoEfied MLPs; pass a fresh dense model")
        module = MoEfiedMLP(layer.mlp, split, top_k, mode)
        layer.mlp = module
        modules.append(module)
    return modules


# ----------------------------------------------------------------------------------------------------------------------
# Glm4Moe export
# ----------------------------------------------------------------------------------------------------------------------


def glm4moe_config(dense_config, recipe: MoEficationRecipe):
    """``Glm4MoeConfig`` holding the MoEfied model: Llama attention, shared block + routed experts per layer."""
    from transformers import Glm4MoeConfig

    size = recipe.expert_size(dense_config.intermediate_size)
    rope = dict(getattr(dense_config, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if "rope_theta" not in rope:
        rope["rope_theta"] = dense_config.rope_theta
    rope["partial_rotary_factor"] = 1.0  # Glm4Moe defaults to 0.5; Llama rotates the whole head
    head_dim = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("biased attention / MLP projections are not supported")
    config = Glm4MoeConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        moe_intermediate_size=size,
        num_experts_per_tok=recipe.top_k,
        n_shared_experts=recipe.shared_neurons // size,
        n_routed_experts=recipe.num_experts,
        routed_scaling_factor=float(recipe.top_k),
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        norm_topk_prob=True,
        use_qk_norm=False,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=getattr(dense_config, "pad_token_id", None),
    )
    config.head_dim = head_dim
    config.partial_rotary_factor = 1.0  # the top-level copy too, for readers that look there
    return config


@dataclass
class Glm4MoeLayer:
    """What the ``Glm4Moe`` container holds for one layer beyond the dense weights (what the shipped artifact stores).

    The neuron partition is integer indices into the dense FFN, and the gate is stored as the container holds it (the
    fitted router already scaled, see the module docstring), so that assembling the model is pure indexing and
    copying: no floating-point arithmetic, hence the same bits on every CPU and thread count.
    """

    shared_idx: torch.Tensor  # [S] integer
    expert_idx: torch.Tensor  # [E, m] integer
    gate_weight: torch.Tensor  # [E, H] float32: router weight times router_logit_scale
    gate_bias: torch.Tensor  # [E] float32 e_score_correction_bias: router bias times router_logit_scale / 4
    router_logit_scale: float  # gate logits / router_logit_scale = the fitted router's logits

    def fitted_split(self, gate_logit_scale: float) -> LayerSplit:
        """The :class:`LayerSplit` this layer came from, the router unscaled again (to float32 rounding)."""
        scale = self.router_logit_scale
        return LayerSplit(
            self.shared_idx.long(),
            self.expert_idx.long(),
            self.gate_weight / scale,
            self.gate_bias * 4 / scale,
            gate_logit_scale / scale,
        )


def glm4moe_layer(split: LayerSplit, gate_logit_scale: float) -> Glm4MoeLayer:
    """Scale a fitted split's router into the ``Glm4Moe`` gate (elementwise float32 products; done once, by the fit).

    The router is multiplied by ``s = split.gate_scale(gate_logit_scale)`` (see the module docstring); its bias goes,
    scaled by ``s / 4`` (the sigmoid's slope at 0), into the selection-only ``e_score_correction_bias``.
    """
    scale = split.gate_scale(gate_logit_scale)
    return Glm4MoeLayer(
        split.shared_idx,
        split.expert_idx,
        (split.router_weight.float() * scale).contiguous(),
        (split.router_bias.float() * scale / 4).contiguous(),
        scale,
    )


def glm4moe_state_dict(
    dense_state: dict[str, torch.Tensor], layers: Sequence[Glm4MoeLayer] | Mapping[int, Glm4MoeLayer]
) -> dict[str, torch.Tensor]:
    """Map a Llama state dict + per-layer :class:`Glm4MoeLayer` onto ``Glm4MoeForCausalLM`` parameter names.

    Pure indexing and copying (bit-exact on any machine): FFN rows and columns gathered by the layers' indices, the
    gate copied as stored. ``layers`` is one entry per layer, or ``{layer index: entry}`` for some layers only.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in dense_state.items():
        if ".mlp." not in name:
            out[name] = tensor.detach().clone()
    for i, layer in layers.items() if isinstance(layers, Mapping) else enumerate(layers):
        pre = f"model.layers.{i}.mlp."
        gate = dense_state[pre + "gate_proj.weight"]
        up = dense_state[pre + "up_proj.weight"]
        down = dense_state[pre + "down_proj.weight"]
        shared = layer.shared_idx.long()
        num_experts, size = layer.expert_idx.shape
        routed = layer.expert_idx.long().reshape(-1)  # expert e's neurons at [e * size, (e + 1) * size)
        out[pre + "shared_experts.gate_proj.weight"] = gate.index_select(0, shared)
        out[pre + "shared_experts.up_proj.weight"] = up.index_select(0, shared)
        out[pre + "shared_experts.down_proj.weight"] = down.index_select(1, shared)
        out[pre + "experts.gate_up_proj"] = torch.cat(  # [E, 2m, H]: expert e's gate rows, then its up rows
            [
                gate.index_select(0, routed).reshape(num_experts, size, -1),
                up.index_select(0, routed).reshape(num_experts, size, -1),
            ],
            dim=1,
        )
        out[pre + "experts.down_proj"] = (  # [E, H, m]: expert e's down-projection columns
            down.index_select(1, routed).reshape(down.shape[0], num_experts, size).permute(1, 0, 2).contiguous()
        )
        if layer.gate_weight.dtype != gate.dtype or layer.gate_bias.dtype != torch.float32:
            raise TypeError(
                f"layer {i}: gate stored as {layer.gate_weight.dtype} / {layer.gate_bias.dtype}, the model wants "
                f"{gate.dtype} / float32 (assembly copies, it never converts)"
            )
        out[pre + "gate.weight"] = layer.gate_weight.clone()
        out[pre + "gate.e_score_correction_bias"] = layer.gate_bias.clone()
    return out


def assemble_glm4moe(dense_config, dense_state: dict[str, torch.Tensor], layers: Sequence[Glm4MoeLayer], recipe):
    """``Glm4MoeForCausalLM`` (eval mode) holding the dense attention/embeddings and the MoEfied FFNs of ``layers``."""
    from transformers import Glm4MoeForCausalLM

    config = glm4moe_config(dense_config, recipe)
    # read by pikv_press.moe.MoEAnatomy.router_logit_scale: gate logits / scale = the fitted router's logits
    config.router_logit_scale = [float(layer.router_logit_scale) for layer in layers]
    state = glm4moe_state_dict(dense_state, layers)
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # buffers not in the state dict (rotary inv_freq) were created on meta: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def build_glm4moe(dense: nn.Module, splits: Sequence[LayerSplit], recipe: MoEficationRecipe):
    """Instantiate the ``Glm4MoeForCausalLM`` (eval mode, dense model's dtype) holding the MoEfied weights."""
    layers = [glm4moe_layer(split, recipe.gate_logit_scale) for split in splits]
    return assemble_glm4moe(dense.config, dense.state_dict(), layers, recipe)
