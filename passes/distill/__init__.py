"""Distillation (`distill`): train the model coming out of the pipeline (a pruned or factorized
student) to match a teacher's outputs, read from an on-disk cache, and put it back into the graph.

The teacher (by default the pipeline's input model) runs once over the training data with ONNX
Runtime; its outputs are cached on disk (`onnxopt.teacher`, resumable), so every epoch and every
later run reads them instead of running it again. The student is the current ONNX graph run by
torch (`torch_graph`): its float weights train, its structure stays; shrunken shapes stay shrunken,
zeros of a recorded N:M or unstructured pattern stay zero, a low-rank pair trains as two factors.
The trained weights are written back into the same graph (`train.py` has the loop and the losses).
torch is an optional extra: `pip install 'onnxopt[train]'`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import numpy as np
import onnx

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, Table, option, sparsity
from onnxopt.errors import SettingError

from .targets import output_pairs, with_label_input, with_top_k
from .train import LOSSES

TRAIN_MEMORY_LIMIT = 2 * 2**30  # training inputs are held in memory, for a shuffled batch order


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    epochs: int = option(3, "passes over the training data")
    lr: float = option(3e-4, "AdamW learning rate (warm-up, then cosine decay); 3e-4 measured best on MiniLM "
                             "and the digits CNN (against 1e-4 and 1e-3)")
    batch_size: int = option(32, "samples per training step (and per cached teacher batch)")
    loss: Literal[LOSSES] = option("auto", "auto: kl for [batch, classes] outputs, mse+cosine for the rest; "
                                           "or mse, cosine, mse+cosine, kl for every output")
    temperature: float = option(2.0, "kl: softening temperature of both distributions")
    max_minutes: Optional[float] = option(None, "stop training after this many minutes")
    samples: Optional[int] = option(None, "training samples to use at most")
    seed: int = option(0, "seed of the batch order and of torch (same seed, same result)")
    outputs: str = option("", "tensors to match, ';'-separated: the graph outputs by default, or intermediate "
                              "tensors (hidden states) that teacher and student share by name; STUDENT=TEACHER "
                              "matches a student tensor to a teacher tensor of another name")
    top_k: Optional[int] = option(None, "cache only the k largest of the teacher's class scores (outputs declared "
                                        "[batch, classes]) and their classes; the KL runs over those k")
    labels: Optional[str] = option(None, "the array of int64 class labels in the training data (not a model "
                                         "input), mixed into the loss by cross-entropy on the class scores")
    label_weight: float = option(0.1, "with labels: the loss is (1 - w) * distillation + w * cross-entropy (0.1, "
                                      "as in Keras's distillation example)")
    teacher: Optional[str] = option(None, "teacher ONNX file (default: the pipeline's input model)")
    data: Optional[str] = option(None, "training data, any form representative data takes (default: the run's "
                                       "train data, else its representative data)")
    threads: int = option(0, "torch threads (0: torch's default)")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "bf16: the student's matrix products in bfloat16 (torch autocast; weights, optimizer and losses stay "
                "float32), about twice as fast where the CPU has AMX or AVX512-BF16; auto: bf16 where it has, fp32 "
                "elsewhere (emulated bf16 is slower)")
    student: Optional[str] = option(None, "module:function (or file.py:function) returning a torch.nn.Module to "
                                          "train instead of the current model, usually a smaller one; the model in "
                                          "hand is its teacher and the exported student replaces it")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise ValueError("epochs, batch_size and samples must be >= 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError("lr and temperature must be > 0")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError("max_minutes must be > 0")
        if self.top_k is not None and (self.top_k < 1 or self.loss not in ("auto", "kl")):
            raise ValueError("top_k must be >= 1 and works with loss=auto or kl")
        if not 0 <= self.label_weight <= 1:
            raise ValueError("label_weight must lie in [0, 1]")


def _torch():
    try:
        import torch
    except ImportError:
        raise OnnxoptError("distill needs torch, which is not installed",
                           "pip install 'onnxopt[train]' (it pins torch==2.13.0, the CPU build)") from None
    return torch


def _precision(torch, choice: str) -> str:
    """`choice`, with auto resolved: bf16 where the CPU multiplies bfloat16 natively."""
    if choice != "auto":
        return choice
    native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if native else "fp32"


class Distill(Pass):
    """Distill: train the current model's weights to match a teacher's outputs (cached on disk),
    keeping its structure; recovers what pruning or low-rank factorization lost."""

    name = "distill"
    Options = DistillOptions
    lossy = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        options = self.options
        torch = _torch()
        learner = self._learner(model, ctx)
        data, notes = self._data(ctx)
        setup, facts = _setup(learner, data, options, ctx)
        threads = torch.get_num_threads()
        if options.threads:
            torch.set_num_threads(options.threads)
        precision = _precision(torch, options.precision)
        try:
            from .train import train

            history = train(setup, options, ctx.progress, bf16=precision == "bf16")
        finally:
            torch.set_num_threads(threads)
        details = {"precision": precision, "teacher_cache": facts, "losses": setup.kinds, "top_k": options.top_k, "labels": options.labels,
                   "epochs": history.epochs, "steps": history.steps,
                   "train_seconds": round(history.seconds, 1), "held_out_loss_before": history.held_out_before,
                   "held_out_loss_after": history.held_out_after, "masked_weights": len(setup.masks)}
        notes.append(f"teacher outputs: {'read from the cache' if facts['hit'] else 'cached'} "
                     f"({facts['batches']} batches, {facts['bytes'] / 2**20:.1f} MB in {facts['seconds']:.0f} s"
                     + (f", resumed after batch {facts['resumed_from']}" if facts.get("resumed_from") and not
                        facts["hit"] else "") + ")")
        if history.stopped_early:
            notes.append(f"stopped after {options.max_minutes} minutes ({history.steps} steps)")
        tables = [_loss_table(history)]
        if options.student:
            from .student import export

            exported = export(learner.student, learner.teacher, setup.inputs[0], learner.pairs)
            notes.append(f"the student {options.student} replaces the model: {_weights(exported)} weights "
                         f"(the teacher has {_weights(learner.teacher)})")
            return PassResult(exported, changed=True, counts={"steps": history.steps}, notes=notes, details=details,
                              tables=tables)
        if not history.held_out_after < history.held_out_before:
            notes.append(f"training did not lower the held-out loss ({history.held_out_before:.4g} -> "
                         f"{history.held_out_after:.4g}); kept the input")
            return PassResult(model, changed=False, notes=notes, details=details, tables=tables)
        written = learner.student.write_back(model)
        return PassResult(model, changed=True, counts={"weights trained": written, "steps": history.steps},
                          notes=notes, details=details, tables=tables)

    def _learner(self, model: onnx.ModelProto, ctx: PassContext) -> _Learner:
        """Teacher and student: the model in hand as a TorchGraph against the pipeline's input, or the
        user's module against the model in hand."""
        pairs = output_pairs(self.options.outputs)
        if self.options.student:
            from onnxopt.inputs import real_inputs

            from .student import Student, load_student

            teacher = self._teacher(ctx, default=model)
            pairs = pairs or [(o.name, o.name) for o in teacher.graph.output]
            student = Student(load_student(self.options.student), [vi.name for vi in real_inputs(teacher)],
                              [s for s, _ in pairs])
            return _Learner(teacher, student, _by_teacher_name(student.by_name, pairs), student.input_names,
                            [t for _, t in pairs], {}, data_model=teacher, pairs=pairs)
        from .torch_graph import TorchGraph

        pairs = pairs or [(o.name, o.name) for o in model.graph.output]
        graph = TorchGraph(model, outputs=[s for s, _ in pairs])
        return _Learner(self._teacher(ctx), graph, _by_teacher_name(graph, pairs), graph.input_names,
                        [t for _, t in pairs], _sparsity_masks(model, graph), data_model=model, pairs=pairs)

    def _teacher(self, ctx: PassContext, default: onnx.ModelProto | None = None) -> onnx.ModelProto:
        if self.options.teacher:
            from onnxopt.model_io import load_model

            return load_model(self.options.teacher)
        if default is not None:
            return default
        if ctx.reference is None:
            raise OnnxoptError("distill needs a teacher", "give teacher=FILE.onnx")
        return ctx.reference.model

    def _data(self, ctx: PassContext):
        if self.options.data:
            from onnxopt.data import RepresentativeData

            return RepresentativeData(self.options.data), []
        if ctx.train is not None:
            return ctx.train, []
        if ctx.data is None:
            raise SettingError("distill needs training data", setting="train", example="train.npz")
        return ctx.data, ["no training data given: trained on the representative (calibration) data; keep your "
                          "evaluation data apart from it"]


@dataclasses.dataclass
class _Learner:
    teacher: onnx.ModelProto
    student: object  # a TorchGraph, or the user's module wrapped in a Student
    forward: object  # feeds -> outputs by name
    input_names: list[str]
    names: list[str]  # the teacher tensors matched
    masks: dict  # id(parameter) -> mask of zeros to keep
    data_model: onnx.ModelProto  # the model the training batches are validated against
    pairs: list[tuple[str, str]]  # (student tensor, teacher tensor)


def _by_teacher_name(forward, pairs: list[tuple[str, str]]):
    """`forward` with its outputs keyed by the teacher tensors they are matched to."""
    if all(s == t for s, t in pairs):
        return forward

    def renamed(feeds):
        outputs = forward(feeds)
        return {teacher: outputs[student] for student, teacher in pairs}

    return renamed


def _setup(learner: _Learner, data, options: DistillOptions, ctx: PassContext):
    """The training setup (batches, cached teacher outputs, losses) and the cache's facts."""
    from onnxopt.teacher import teacher_outputs

    from . import train as train_
    from .torch_graph import as_tensors

    teacher, top_k = learner.teacher, {}
    if options.top_k:
        teacher, top_k = with_top_k(teacher, learner.names, options.top_k)
    cached_names = [n for n in learner.names if n not in top_k] + [c for cut in top_k.values() for c in cut]
    data_model = with_label_input(learner.data_model, options.labels) if options.labels else learner.data_model
    batches = data.batches(data_model, options.batch_size, options.samples, trim_padding=True)
    cached, facts = teacher_outputs(teacher, batches, ctx.cache, outputs=cached_names, ep=ctx.ep,
                                    progress=ctx.progress)
    inputs = _inputs(batches, learner.input_names + ([options.labels] if options.labels else []), as_tensors)
    if not inputs:
        raise OnnxoptError("distill: the training data holds no samples")
    first = cached.batch(0)
    softmax = {o for n in learner.teacher.graph.node if n.op_type == "Softmax" for o in n.output}
    shapes = [first[top_k[n][0] if n in top_k else n].shape for n in learner.names]
    kinds = train_.loss_kinds(learner.names, shapes, softmax, options.loss)
    kinds.update({n: "kl-probabilities" if n in softmax else "kl" for n in top_k})  # even at k = 1
    label_output = next((n for n, kind in kinds.items() if kind.startswith("kl")), None)
    if options.labels and label_output is None:
        raise OnnxoptError(f"distill:labels={options.labels}: no matched output holds class scores [batch, classes] "
                           "to score the labels against", "match the class-score output (outputs=)")
    setup = train_.Setup(student=learner.forward, parameters=[p for p in learner.student.parameters() if p.requires_grad],
                         inputs=inputs, teacher=cached.batch, kinds=kinds,
                         mask_input=batches.padding.mask if batches.padding else None, masks=learner.masks,
                         module=learner.student if options.student else None, top_k=top_k, labels=options.labels,
                         label_output=label_output, label_weight=options.label_weight if options.labels else 0.0)
    return setup, facts


def _inputs(batches, names, as_tensors) -> list:
    inputs, held = [], 0
    for feeds in batches:
        tensors = as_tensors(feeds, names)
        held += sum(t.numel() * t.element_size() for t in tensors.values())
        if held > TRAIN_MEMORY_LIMIT:
            raise OnnxoptError(f"distill: the training inputs pass {TRAIN_MEMORY_LIMIT / 2**30:.0f} GiB, which "
                               "distill holds in memory", "give samples= to train on fewer")
        inputs.append(tensors)
    return inputs


def _sparsity_masks(model: onnx.ModelProto, graph) -> dict:
    """Masks keeping the zeros of weights whose N:M or unstructured pattern the model records."""
    records = sparsity.read(model)
    masks = {}
    for node in model.graph.node:
        if sparsity.layer_key(node) in records and len(node.input) > 1 and node.input[1] in graph.parameter_of:
            weight = graph.parameter(node.input[1])
            masks[id(weight)] = (weight.detach() != 0).to(weight.dtype)
    return masks


def _weights(model: onnx.ModelProto) -> str:
    count = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return f"{count / 1e6:.1f} M" if count >= 1e5 else str(count)


def _loss_table(history) -> Table:
    rows = [["held out, before", f"{history.held_out_before:.4g}"]]
    rows += [[f"epoch {i + 1} (training)", f"{loss:.4g}"] for i, loss in enumerate(history.epochs)]
    rows.append(["held out, after", f"{history.held_out_after:.4g}"])
    return Table(title="distillation loss", columns=["", "loss"], rows=rows)

