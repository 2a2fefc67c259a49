"""What the activation tests read, captured one block at a time (methods.md §L7.4.1, §L7.4.4).

Both models run through :class:`lmsurgeon.streaming.StreamedModel`: the plain path when the model fits the memory
budget, block by block when it does not, with the same numbers. At the shared word items this records, per block:

* the hidden state after the block (float64; ``act_cka``'s input);
* for a dense MLP (any activation: GELU, ReLU, SwiGLU, BERT's intermediate), every unit's *activation* — the
  input of the down-projection, taken by a forward pre-hook on the module the registry names for ``down``, so the
  family's own nonlinearity, gating and biases are what is measured — and its *readout*, the block's input
  residual projected on the unit's down-projection column (float32);
* for a mixture-of-experts layer, the MLP input (the output of the norm feeding the router) and the block's input
  residual (float32): which experts to compare depends on the other model, so their units are computed later from
  the experts' weights (:func:`expert_views`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmsurgeon.lineage.phi_u import mlp_kind


@dataclass
class MlpCapture:
    """One block's MLP at the items: ``kind`` is ``dense``, ``moe`` or None (no MLP the tests can read)."""

    kind: str | None
    act: np.ndarray | None = None  # [n, m] dense: input of the down-projection
    readout: np.ndarray | None = None  # [n, m] dense: block input residual @ W_down
    mlp_input: np.ndarray | None = None  # [n, d] moe: what the router and the experts read
    block_input: np.ndarray | None = None  # [n, d] moe: residual entering the block


@dataclass
class Activations:
    """One model's activations at the shared items, one entry per block."""

    hidden: list[np.ndarray] = field(default_factory=list)
    mlp: list[MlpCapture] = field(default_factory=list)


def _module_path(layout, role: str, layer: int) -> str | None:
    where = layout.role_module(role, layer)
    return None if where is None else where[0]


def down_matrix(layout, module: torch.nn.Module) -> np.ndarray:
    """The down-projection of a loaded module as ``[d, m]`` (GPT-2's Conv1D stores it ``[m, d]``)."""
    W = module.weight.detach().double().cpu().numpy()
    return W.T if layout.family.spec("down").layout == "conv1d" else W


def capture(
    layout,
    enc: list[dict],
    keep: list[list[int]],
    *,
    max_memory: int | str | None = None,
    mode: str = "auto",
    batch_size: int = 8,
    with_mlp: bool = True,
    blocks: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Activations:
    """Run the model on the texts that have items and record, at the items, what the module doc lists.

    ``max_memory`` and ``mode`` are :class:`~lmsurgeon.streaming.StreamedModel`'s: with ``auto`` a model that
    does not fit ``max_memory`` streams one block at a time. ``blocks`` runs only the first that many blocks (all
    when None): what is recorded at block i depends on blocks 0…i alone, so nothing after them is read.
    ``dtype`` is the compute dtype (:func:`lmsurgeon.streaming.compute_dtype` picks one that fits the budget).
    """
    from lmsurgeon.streaming import StreamedModel

    sequences = [e["ids"] for e, k in zip(enc, keep, strict=True) if k]
    positions = [[e["ends"][c] for c in k] for e, k in zip(enc, keep, strict=True) if k]
    model = StreamedModel(
        layout.handle, kind="base", dtype=dtype, max_memory=max_memory, mode=mode, batch_size=batch_size
    )
    # per micro-batch, (row in the batch, token position) of each item, in item order
    where = []
    for start in range(0, len(sequences), batch_size):
        rows = [(r, p) for r, ps in enumerate(positions[start : start + batch_size]) for p in ps]
        where.append((torch.tensor([r for r, _ in rows]), torch.tensor([p for _, p in rows])))

    def at_items(per_batch: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t[r, p] for t, (r, p) in zip(per_batch, where, strict=True)]).double().cpu().numpy()

    acts = Activations()
    residual = model.embed(sequences)
    for index, block in model.blocks(0, None if blocks is None else min(blocks, model.n_layers)):
        kind = mlp_kind(layout, index) if with_mlp else None
        role = {"dense": "down", "moe": "mlp_norm"}.get(kind or "")
        path = _module_path(layout, role, index) if role else None
        seen: list[torch.Tensor] = []
        handle = None
        if path is not None:
            module = block.get_submodule(path)
            if kind == "dense":
                handle = module.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
            else:
                handle = module.register_forward_hook(
                    lambda _m, _args, out, seen=seen: seen.append(out[0] if isinstance(out, tuple) else out)
                )
        block_input = residual.hidden()
        try:
            residual = model.apply_block(index, block, residual)
        finally:
            if handle is not None:
                handle.remove()
        acts.hidden.append(at_items(residual.hidden()))
        if path is None or len(seen) != len(where):
            acts.mlp.append(MlpCapture(None))
        elif kind == "dense":
            h_in = at_items(block_input)
            acts.mlp.append(
                MlpCapture(
                    "dense",
                    act=at_items(seen).astype(np.float32),
                    readout=(h_in @ down_matrix(layout, module)).astype(np.float32),
                )
            )
        else:
            acts.mlp.append(
                MlpCapture(
                    "moe",
                    mlp_input=at_items(seen).astype(np.float32),
                    block_input=at_items(block_input).astype(np.float32),
                )
            )
    return acts


def _activation_function(layout):
    """The experts' nonlinearity, by the config's name, as transformers' modelling code picks it."""
    from transformers.activations import ACT2FN

    name = layout.cfg("hidden_act") or layout.cfg("hidden_activation") or "silu"
    return ACT2FN[name]


def expert_views(layout, layer: int, cap: MlpCapture, prefix: str, expert: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Activation and readout ``[n, m]`` of one expert (``prefix`` ``experts`` or ``shared``) of an MoE layer,
    computed from its weights on the captured MLP input: act(x W_gateᵀ) ⊙ (x W_upᵀ), and h_in W_down."""
    assert cap.mlp_input is not None and cap.block_input is not None
    x = cap.mlp_input.astype(np.float64)
    up = x @ layout.read(f"{prefix}.up", layer, expert).T
    f = _activation_function(layout)
    if layout.has(f"{prefix}.gate", layer, expert if expert is not None else None):
        gate = x @ layout.read(f"{prefix}.gate", layer, expert).T
        act = f(torch.from_numpy(gate)).numpy() * up
    else:
        act = f(torch.from_numpy(up)).numpy()
    readout = cap.block_input.astype(np.float64) @ layout.read(f"{prefix}.down", layer, expert)
    return act, readout


def router_logits(layout, layer: int, cap: MlpCapture) -> np.ndarray:
    """``[n, E]`` router logits of the layer's experts at the items (rows of ``experts.up`` present only)."""
    assert cap.mlp_input is not None
    experts = layout.experts(layer, "experts.up")
    return cap.mlp_input.astype(np.float64) @ layout.read("router", layer)[experts].T
