"""Routed experts read a group at a time while their block runs, for MoE blocks larger than the memory budget.

A GLM-4.5-Air MoE block is 4.6 GB in bf16, 4.4 GB of it its 128 routed experts; with a 6 GiB budget one such
block does not fit beside the process, the head and a second block (swap keeps two). Every token uses only its
top-k experts, and the experts module's output is a sum of independent per-expert terms, so the block can run
with everything but the routed experts loaded, and the experts module computes its sum over groups of experts,
each group read from the checkpoint, applied and freed. Peak memory for the block is then its attention, router
and shared expert plus one group.

The sum is computed by the family's own experts module (transformers' ``@use_experts_implementation`` classes):
for each group its fused parameters are set to the group's experts only, ``num_experts`` to the group's size, and
the routing indices are renumbered into the group, with every slot routed outside the group given the index
``num_experts`` and weight 0: the expert-parallel sentinel that every transformers experts implementation skips
(eager) or masks (batched and grouped matmuls). The groups' outputs are added. The result equals the whole
block's to float rounding (the per-expert terms are added in a different grouping), tested to 1e-5 in float32.
Experts no token is routed to are not read at all.

Cost: the experts are read again on every call of the block (local pages or the range cache, not the network,
after the first), so streaming experts is chosen only for blocks that do not fit: see :func:`streams_experts`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from lmsurgeon.streaming.skeleton import StackedExperts

#: a block larger than this share of the budget runs its routed experts a group at a time
BLOCK_SHARE = 0.25
#: one group of experts takes at most this share of the budget
GROUP_SHARE = 0.125
#: the per-expert checkpoint tensors (``mlp.experts.17.up_proj.weight``) that transformers fuses on load
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def streams_experts(block_bytes: int, budget: int) -> bool:
    """Whether a block of ``block_bytes`` (compute dtype) runs its routed experts in groups under ``budget``."""
    return block_bytes > budget * BLOCK_SHARE


def group_size(expert_bytes: int, budget: int) -> int:
    """Experts per group: as many as fit :data:`GROUP_SHARE` of the budget, at least one."""
    return max(1, int(budget * GROUP_SHARE // max(expert_bytes, 1)))


def experts_modules(block: torch.nn.Module, prefix: str, deferred: dict[str, StackedExperts]) -> dict[str, Any]:
    """The experts modules of ``block`` (named ``prefix`` in the model) whose every parameter is in ``deferred``
    and whose forward takes transformers' routing arguments, by module path."""
    found = {}
    for path, module in block.named_modules(prefix=prefix):
        n = getattr(module, "num_experts", None)
        params = dict(module.named_parameters(recurse=False))
        if not isinstance(n, int) or not params:
            continue
        if all(f"{path}.{name}" in deferred for name in params) and _routing_arguments(module) is not None:
            found[path] = module
    return found


def _routing_arguments(module: torch.nn.Module) -> tuple[int, int] | None:
    """Positions (after ``self``) of ``top_k_index`` and ``top_k_weights`` in the module's forward, or None when it
    does not take them (an experts module of another kind: it is then loaded whole)."""
    names = list(inspect.signature(type(module).forward).parameters)[1:]
    if "top_k_index" not in names or "top_k_weights" not in names:
        return None
    return names.index("top_k_index"), names.index("top_k_weights")


class GroupedExperts:
    """Installed on one experts module of a loaded block: its forward runs the routed experts a group at a time.

    ``read(stacked, experts)`` returns the fused parameter's rows for those experts; ``size`` is the group size.
    :meth:`remove` restores the module's own forward (its parameters stay on the meta device).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        sources: dict[str, StackedExperts],
        read: Callable[[StackedExperts, list[int]], torch.Tensor],
        size: int,
    ):
        positions = _routing_arguments(module)
        if positions is None:
            raise TypeError(f"{type(module).__name__}.forward takes no top_k_index/top_k_weights")
        experts: Any = module
        self.module = experts
        self.sources, self.read, self.size = sources, read, size
        self.index_at, self.weight_at = positions
        self.n_experts: int = experts.num_experts
        self.calls = 0
        self.experts_read = 0
        self.module.forward = self.forward

    def remove(self) -> None:
        if "forward" in vars(self.module):
            del self.module.forward

    def forward(self, *given, **kwargs) -> torch.Tensor:
        args = list(given)
        index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[self.index_at]
        weights = kwargs["top_k_weights"] if "top_k_weights" in kwargs else args[self.weight_at]
        hit = [e for e in torch.unique(index).tolist() if 0 <= e < self.n_experts]
        self.calls += 1
        total: torch.Tensor | None = None
        for a in range(0, len(hit), self.size):
            group = hit[a : a + self.size]
            lookup = torch.full((self.n_experts + 1,), len(group), dtype=index.dtype, device=index.device)
            lookup[torch.tensor(group, device=index.device)] = torch.arange(len(group), device=index.device)
            local = lookup[index.clamp(0, self.n_experts)]
            local_weights = weights.masked_fill(local == len(group), 0)
            part = self._run(group, args, kwargs, local, local_weights)
            total = part if total is None else total.add_(part)
            self.experts_read += len(group)
        if total is None:  # no token routed to any expert: the module's sum over nothing
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return torch.zeros_like(hidden)
        return total

    def _run(self, group: list[int], args: list, kwargs: dict, index: torch.Tensor, weights: torch.Tensor):
        """The experts module's own forward with its parameters and ``num_experts`` narrowed to ``group``."""
        module: Any = self.module
        names = list(self.sources)
        saved = {name: module._parameters[name] for name in names}
        for name in names:
            module._parameters[name] = torch.nn.Parameter(self.read(self.sources[name], group), requires_grad=False)
        module.num_experts = len(group)
        args, kwargs = list(args), dict(kwargs)
        for key, at, value in (("top_k_index", self.index_at, index), ("top_k_weights", self.weight_at, weights)):
            if key in kwargs:
                kwargs[key] = value
            else:
                args[at] = value
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            module.num_experts = self.n_experts
            for name, param in saved.items():
                module._parameters[name] = param
