"""Dense-masked execution of Hugging Face MoE experts: one pair of large matmuls instead of a loop over experts.

transformers runs the routed experts of its MoE families either expert by expert (``eager``: gather the tokens routed
to each expert, two small matmuls, scatter back) or through ``grouped_mm``/``batched_mm``.  On a CPU, with many small
experts (the embedded model has 64 experts of 12 neurons, 32 selected per token), the loop and the gathers dominate.
:func:`use_dense_masked_experts` switches a model to an implementation that computes every expert on every token as
two large matmuls and multiplies each expert's activations by its routing weight, zero for unselected experts. The
function is the same as eager's (same experts, same weights); only the order of floating-point additions differs, so
outputs agree to rounding, and routing decisions taken downstream may flip where router logits are tied to rounding.
It costs ``num_experts / top_k`` times the routed FLOPs of eager; it pays off when experts are small.

It plugs into transformers' experts interface (``ExpertsInterface``), so models keep their modules, hooks and
routing; presses and the router tap see the same model.
"""

from __future__ import annotations

import torch
from torch import nn

DENSE_MASKED = "pikv_dense_masked"


def dense_masked_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward of transformers' interface: [N, H] tokens, [N, k] selected experts and their weights."""
    num_experts, two_m, hidden = self.gate_up_proj.shape
    tokens = hidden_states.shape[0]
    gate_up = hidden_states @ self.gate_up_proj.reshape(num_experts * two_m, hidden).T  # [N, E * 2m]
    act = self._apply_gate(gate_up.view(tokens, num_experts, two_m))  # [N, E, m]
    weights = torch.zeros(tokens, num_experts, dtype=act.dtype, device=act.device)
    weights.scatter_(1, top_k_index, top_k_weights.to(act.dtype))
    act = (act * weights[..., None]).reshape(tokens, -1)  # [N, E * m]
    down = self.down_proj.permute(1, 0, 2).reshape(hidden, -1)  # [H, E * m]
    return (act @ down.T).to(hidden_states.dtype)


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module that transformers' experts interface dispatches."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "is_transposed") and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
    ]


def use_dense_masked_experts(model: nn.Module) -> str | None:
    """Run ``model``'s routed experts dense-masked (see the module docstring); returns the previous implementation.

    Raises ``ValueError`` for a model without experts modules of transformers' interface, or whose experts carry
    biases or transposed weights (GPT-OSS): those keep their own implementation.
    ``model.config._experts_implementation = previous`` switches back.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    modules = experts_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no experts module of transformers' experts interface "
            "(stacked gate_up_proj / down_proj); dense-masked experts apply to Hugging Face MoE models only"
        )
    for name, module in modules:
        if module.has_bias or module.is_transposed or module.gate_up_proj.dim() != 3:
            raise ValueError(
                f"{name} ({type(module).__name__}) stores biased or transposed expert weights; dense-masked experts "
                "support gate_up_proj [E, 2m, H] and down_proj [E, H, m] without bias; keep its own implementation"
            )
    if DENSE_MASKED not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(DENSE_MASKED, dense_masked_experts_forward)
    previous = model.config._experts_implementation
    configs = {id(module.config): module.config for _, module in modules}
    configs.setdefault(id(model.config), model.config)
    for config in configs.values():
        config._experts_implementation = DENSE_MASKED
    return previous
