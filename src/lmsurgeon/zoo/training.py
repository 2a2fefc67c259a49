"""Causal-LM training and perplexity on token streams: the small, deterministic loop the zoo runs on CPU.

Documents are tokenised once into one stream (each ended by the tokenizer's eos); training draws random
windows from it with a seeded generator, evaluation walks it in consecutive blocks. AdamW with decoupled
weight decay on matrices only (norm gains and biases are not decayed, as usual, so their drift is learned
signal), linear warm-up and cosine decay, gradient clipping at 1.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainPlan:
    """How long and how hard to train; everything that changes the weights, so it goes into the recipe hash."""

    steps: int
    batch: int
    seq_len: int
    lr: float
    seed: int
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1
    clip: float = 1.0


def encode_stream(tok: Tokenizer, texts: list[str], eos_id: int) -> torch.Tensor:
    """All documents' ids (with the tokenizer's own post-processing, e.g. a leading bos) each followed by eos."""
    ids: list[int] = []
    for encoding in tok.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, plan: TrainPlan) -> Iterator[torch.Tensor]:
    """``plan.steps`` batches ``[batch, seq_len]`` of windows starting at seeded random offsets."""
    generator = torch.Generator().manual_seed(plan.seed)
    span = stream.numel() - plan.seq_len
    if span <= 0:
        raise ValueError(f"a stream of {stream.numel()} tokens is shorter than one {plan.seq_len}-token window")
    positions = torch.arange(plan.seq_len)
    for _ in range(plan.steps):
        starts = torch.randint(0, span + 1, (plan.batch,), generator=generator)
        yield stream[starts[:, None] + positions]


def causal_lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` ``[B, T]`` (computed here, not by transformers' loss hooks)."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (embeddings included) decay; vectors (norm gains, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    unique = list({id(p): p for p in params}.values())  # tied weights once
    return [
        {"params": [p for p in unique if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in unique if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_factor(step: int, plan: TrainPlan) -> float:
    """Linear warm-up to 1, then cosine down to ``min_lr_frac``."""
    warmup = max(1, int(plan.steps * plan.warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, plan.steps - warmup)
    return plan.min_lr_frac + (1 - plan.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    stream: torch.Tensor,
    plan: TrainPlan,
    *,
    loss_fn: LossFn = causal_lm_loss,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on windows of ``stream``; returns the per-step losses."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(_param_groups(model, plan.weight_decay), lr=plan.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, plan))
    model.train()
    losses = []
    for step, batch in enumerate(random_windows(stream, plan)):
        loss = loss_fn(model, batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.clip)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """``exp`` of the mean next-token NLL over consecutive ``seq_len`` blocks of ``stream`` (last block may be
    shorter); token-weighted, accumulated in float64 so the same weights always give the same number."""
    model.eval()
    device = next(model.parameters()).device
    blocks = list(stream.split(seq_len))
    if blocks and blocks[-1].numel() < 2:
        blocks.pop()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        group = blocks[i : i + batch]
        same = [b for b in group if b.numel() == seq_len]
        for ids in ([torch.stack(same)] if same else []) + [b[None] for b in group if b.numel() != seq_len]:
            logits = model(input_ids=ids.to(device)).logits[:, :-1].double()
            total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten().to(device), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic kernels for the duration; the caller's RNG state and setting come back after.

    On CUDA, cuBLAS is only deterministic with ``CUBLAS_WORKSPACE_CONFIG`` set before its first use, so we
    set it if nobody has; where a kernel has no deterministic version torch warns instead of failing.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
