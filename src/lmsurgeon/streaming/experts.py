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
``num_experts`` and weight 0: the expert-parallel sentinel, which every transformers experts implementation skips
(eager) or masks (batched and grouped matmuls) when the module is in expert-parallel mode, as it is for the
call. The groups' outputs are added. The result equals the whole
block's to float rounding (the per-expert terms are added group by group), tested to 1e-5 in float32. Experts
no token is routed to are not read at all.

A layer-streamed pass applies a block to every micro-batch while it is loaded; :meth:`GroupedExperts.run_batches`
lets all of them meet at the experts so that each group is read once per pass, not once per batch. A block
called again later (swap's replays) reads its experts again, from local pages or the range cache rather than
the network, so streaming experts is chosen only for blocks that do not fit: see :func:`streams_experts`.
"""

from __future__ import annotations

import inspect
import re
import threading
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
        self._collective = threading.local()  # .slot: which item of run_batches this thread runs
        self._requests: list[Any] = []
        self._results: list[Any] = []
        self._arrived: list[threading.Event] = []
        self._go: list[threading.Event] = []
        self.module.forward = self.forward

    def remove(self) -> None:
        if "forward" in vars(self.module):
            del self.module.forward

    def forward(self, *given, **kwargs) -> torch.Tensor:
        slot = getattr(self._collective, "slot", None)
        if slot is not None and self._requests[slot] is None:  # a batch of run_batches: wait for the others
            self._requests[slot] = (list(given), dict(kwargs))
            self._arrived[slot].set()
            self._go[slot].wait()
            result = self._results[slot]
            if isinstance(result, BaseException):
                raise result
            return result
        return self._sum([(list(given), dict(kwargs))])[0]

    def run_batches(self, fn: Callable[[Any], torch.Tensor], items: list) -> list[torch.Tensor]:
        """``[fn(item) for item in items]``, where ``fn`` runs the block this module belongs to, with each group
        of experts read once for all items instead of once per item.

        Each item's block runs in its own thread up to this module's call, one item after another (so forward
        hooks fire in item order), and waits there; the experts' sums are then computed group by group for every
        waiting item, and the items finish their blocks, again one after another. The numbers are those of
        calling ``fn`` on each item in turn (the same operations on the same inputs; the experts' terms grouped
        by the union of the items' experts).
        """
        n = len(items)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        outputs: list[Any] = [None] * n
        errors: list[BaseException | None] = [None] * n
        self._requests = [None] * n
        self._results = [None] * n
        self._arrived = [threading.Event() for _ in range(n)]
        self._go = [threading.Event() for _ in range(n)]
        done = [threading.Event() for _ in range(n)]

        def work(i: int) -> None:
            self._collective.slot = i
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad and not inference):
                    outputs[i] = fn(items[i])
            except BaseException as e:  # re-raised in the caller's thread below
                errors[i] = e
            finally:
                self._collective.slot = None
                self._arrived[i].set()  # also when it finished or failed without reaching the experts
                done[i].set()

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
        try:
            for i, thread in enumerate(threads):
                thread.start()
                self._arrived[i].wait()
            waiting = [i for i in range(n) if self._requests[i] is not None and not done[i].is_set()]
            try:
                sums = self._sum([self._requests[i] for i in waiting])  # type: ignore[misc]
                for i, total in zip(waiting, sums, strict=True):
                    self._results[i] = total
            except BaseException as e:
                for i in waiting:
                    self._results[i] = e
            for i in range(n):
                self._go[i].set()
                done[i].wait()
        finally:
            for event in self._go:
                event.set()
            for thread in threads:
                thread.join()
            self._requests, self._results = [], []
        for e in errors:
            if e is not None:
                raise e
        return outputs

    def _sum(self, requests: list[tuple[list, dict]]) -> list[torch.Tensor]:
        """The experts module's output for each request (its forward's arguments), each group of the experts
        that any request routes to read once."""
        routes = []
        for args, kwargs in requests:
            index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[self.index_at]
            weights = kwargs["top_k_weights"] if "top_k_weights" in kwargs else args[self.weight_at]
            routes.append((index, weights, {e for e in torch.unique(index).tolist() if 0 <= e < self.n_experts}))
        hits = sorted(set().union(*(hit for _, _, hit in routes)))
        self.calls += len(requests)
        totals: list[torch.Tensor | None] = [None] * len(requests)
        for a in range(0, len(hits), self.size):
            group = hits[a : a + self.size]
            params = {name: self.read(source, group) for name, source in self.sources.items()}
            self.experts_read += len(group)
            for r, ((args, kwargs), (index, weights, hit)) in enumerate(zip(requests, routes, strict=True)):
                if hit.isdisjoint(group):
                    continue
                lookup = torch.full((self.n_experts + 1,), len(group), dtype=index.dtype, device=index.device)
                lookup[torch.tensor(group, device=index.device)] = torch.arange(len(group), device=index.device)
                local = lookup[index.clamp(0, self.n_experts)]
                part = self._run(params, args, kwargs, local, weights.masked_fill(local == len(group), 0))
                totals[r] = part if totals[r] is None else totals[r].add_(part)  # type: ignore[union-attr]
            del params
        out = []
        for (args, kwargs), total in zip(requests, totals, strict=True):
            if total is None:  # no token routed to any expert: the module's sum over nothing
                total = torch.zeros_like(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            out.append(total)
        return out

    def _run(self, params: dict[str, torch.Tensor], args: list, kwargs: dict, index, weights) -> torch.Tensor:
        """The experts module's own forward with its parameters narrowed to one group's (``params``) and
        ``num_experts`` to the group's size."""
        module: Any = self.module
        saved = {name: module._parameters[name] for name in params}
        for name, value in params.items():
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        module.num_experts = next(iter(params.values())).shape[0]
        # the sentinel is skipped or masked only in expert-parallel mode: the batched and grouped matmuls leave
        # its rows uninitialised otherwise, and 0 × NaN there would reach the sum
        parallel = getattr(module, "_is_expert_parallel", None)
        module._is_expert_parallel = True
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
            module._is_expert_parallel = parallel
            for name, param in saved.items():
                module._parameters[name] = param
