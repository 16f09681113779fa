"""The training loop of `distill`: the student (a `TorchGraph`, or a user's torch module) against
cached teacher outputs, batch for batch.

Each output gets a loss by its kind: `kl` (divergence of the temperature-softened distributions,
scaled by T^2 as Hinton et al. do) for class scores, `mse+cosine` for embeddings and hidden states
(the mix the MiniLM study in issue 19 measured best), or what the user names. Sequence outputs
[batch, sequence, ...] count real tokens only when the data has an attention mask: padding is not
something the student should learn to copy.

With `top_k` the teacher's class scores come cut to their k largest (`targets.py`): the KL runs
over those k classes. With `labels`, the cross-entropy against the data's hard labels is mixed in:
(1 - label_weight) * distillation + label_weight * cross-entropy.

Some batches are held out (every tenth, when there are ten or more) to measure the loss before and
after training; the pass keeps its input when training did not lower it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("auto", "mse", "cosine", "mse+cosine", "kl")


@dataclasses.dataclass
class History:
    epochs: list[float] = dataclasses.field(default_factory=list)  # mean training loss per epoch
    held_out_before: float = math.nan
    held_out_after: float = math.nan
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def loss_kinds(names: Sequence[str], shapes: Sequence[tuple[int, ...]], softmax_outputs: set[str], choice: str) -> dict[str, str]:
    """The loss per output: `choice`, or for `auto` kl on [batch, classes] (probabilities when a
    Softmax made them) and mse+cosine on the rest."""
    if choice != "auto":
        return {name: choice for name in names}
    kinds = {}
    for name, shape in zip(names, shapes):
        if len(shape) == 2 and shape[1] > 1:
            kinds[name] = "kl-probabilities" if name in softmax_outputs else "kl"
        else:
            kinds[name] = "mse+cosine"
    return kinds


def output_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float,
                weight: torch.Tensor | None, classes: torch.Tensor | None = None) -> torch.Tensor:
    """One output's loss; `weight` [batch, sequence] of 0/1 masks positions of sequence outputs;
    `classes` (with kl): the classes `teacher` holds the scores of, its top k."""
    student, teacher = student.float(), teacher.float()
    if kind in ("kl", "kl-probabilities"):
        if kind == "kl":
            log_s = F.log_softmax(student / temperature, dim=-1)
            t = F.softmax(teacher / temperature, dim=-1)  # over the top k alone when cut: renormalized
            scale = temperature ** 2
        else:  # outputs that are already probabilities
            log_s, t, scale = torch.log(student.clamp_min(1e-12)), teacher, 1.0
        if classes is not None:
            log_s = log_s.gather(-1, classes)
        per_position = (t * (torch.log(t.clamp_min(1e-12)) - log_s)).sum(-1) * scale
    else:
        squared = (student - teacher) ** 2
        per_position = squared.mean(-1) if student.dim() > 1 else squared
        if "mse" not in kind:
            per_position = torch.zeros_like(per_position)
        if "cosine" in kind and student.dim() > 1:
            per_position = per_position + 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if weight is not None and per_position.dim() >= 2 and tuple(per_position.shape[:2]) == tuple(weight.shape):
        w = weight.to(per_position.dtype).reshape(weight.shape + (1,) * (per_position.dim() - 2))
        return (per_position * w).sum() / (w.sum() * per_position[0, 0].numel()).clamp_min(1)
    return per_position.mean()


def split(num_batches: int) -> tuple[list[int], list[int]]:
    """(training, held-out) batch indices: every tenth batch held out when there are ten or more."""
    if num_batches < 10:
        return list(range(num_batches)), list(range(num_batches))
    held = [i for i in range(num_batches) if i % 10 == 9]
    return [i for i in range(num_batches) if i % 10 != 9], held


@dataclasses.dataclass
class Setup:
    student: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # feeds -> outputs by teacher name
    parameters: list[torch.nn.Parameter]
    inputs: list[dict[str, torch.Tensor]]  # per batch
    teacher: Callable[[int], dict[str, np.ndarray]]  # batch index -> outputs
    kinds: dict[str, str]
    mask_input: str | None  # the attention-mask feed, weighting sequence outputs
    masks: dict[int, torch.Tensor]  # id(parameter) -> 0/1 mask of the weights that must stay zero
    module: torch.nn.Module | None = None  # put in training mode (dropout) for the steps, eval mode otherwise
    top_k: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # output -> cached (values, classes)
    labels: str | None = None  # the feed holding hard labels
    label_output: str | None = None  # the class-score output they are scored against
    label_weight: float = 0.0


def mean_loss(setup: Setup, indices: Sequence[int], temperature: float) -> float:
    if setup.module is not None:
        setup.module.eval()
    total = 0.0
    with torch.no_grad():
        for i in indices:
            total += float(_batch_loss(setup, i, temperature))
    return total / max(len(indices), 1)


def _batch_loss(setup: Setup, index: int, temperature: float) -> torch.Tensor:
    feeds = setup.inputs[index]
    outputs = setup.student(feeds)
    targets = setup.teacher(index)
    weight = feeds.get(setup.mask_input) if setup.mask_input else None
    loss = 0
    for name, kind in setup.kinds.items():
        if name in setup.top_k:
            values, classes = (torch.from_numpy(np.array(targets[n])) for n in setup.top_k[name])
            loss = loss + output_loss(outputs[name], values, kind, temperature, weight, classes)
        else:
            loss = loss + output_loss(outputs[name], torch.from_numpy(np.array(targets[name])), kind, temperature,
                                      weight)
    if setup.labels is None:
        return loss
    scores = outputs[setup.label_output].float()
    log_p = torch.log(scores.clamp_min(1e-12)) if setup.kinds[setup.label_output] == "kl-probabilities" else \
        F.log_softmax(scores, dim=-1)
    hard = F.nll_loss(log_p, feeds[setup.labels].long().reshape(-1))
    return (1 - setup.label_weight) * loss + setup.label_weight * hard


def train(setup: Setup, options, progress, bf16: bool = False) -> History:
    """AdamW with a linear warm-up over the first 5 % of the steps and a cosine decay; stops after
    `options.epochs` epochs or `options.max_minutes`. Weights under a mask stay zero. With `bf16`,
    the training steps run under torch's CPU autocast (matrix products in bfloat16, the weights,
    their updates and the losses in float32); the held-out loss is measured in float32 before and
    after, so that the comparison is the same either way."""
    torch.manual_seed(options.seed)
    order = np.random.default_rng(options.seed)
    train_idx, held_idx = split(len(setup.inputs))
    history = History(held_out_before=mean_loss(setup, held_idx, options.temperature))
    optimizer = torch.optim.AdamW(setup.parameters, lr=options.lr, weight_decay=0.0)
    total = options.epochs * len(train_idx)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(step, total) / max(total, 1)))))
    start, deadline = time.perf_counter(), (options.max_minutes or math.inf) * 60
    running: list[float] = []
    if setup.module is not None:
        setup.module.train()

    def status() -> str:
        return f"loss {np.mean(running[-20:]):.4g}" if running else ""

    steps = ((epoch, i) for epoch in range(options.epochs) for i in order.permutation(train_idx))
    epoch_losses: dict[int, list[float]] = {}
    for epoch, i in progress(steps, "distilling", "step", total=total, status=status):
        if time.perf_counter() - start > deadline:
            history.stopped_early = True
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _batch_loss(setup, int(i), options.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for p in setup.parameters:
                mask = setup.masks.get(id(p))
                if mask is not None:
                    p.mul_(mask)
        running.append(loss.item())
        epoch_losses.setdefault(epoch, []).append(running[-1])
        history.steps += 1
    history.seconds = time.perf_counter() - start
    history.epochs = [float(np.mean(v)) for _, v in sorted(epoch_losses.items())]
    history.held_out_after = mean_loss(setup, held_idx, options.temperature)
    return history
