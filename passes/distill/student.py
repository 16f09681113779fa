"""A student of the user's own (`distill:student=module:function`): a torch module, usually smaller
than the teacher (MiniLM with 3 of its 6 layers, say), trained on the cached teacher outputs and
exported to ONNX with the teacher's input and output names and opset.

The function takes no arguments and returns a `torch.nn.Module` whose `forward` parameters are named
like the teacher's inputs (in any order; the ones the data does not hold must have defaults) and
which returns the teacher's outputs: one tensor, a tuple in the teacher's output order, or a mapping
by output name (a Hugging Face model's output object is one).
"""
from __future__ import annotations

import inspect
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

from onnxopt import OnnxoptError
from onnxopt.imports import import_object


def load_student(spec: str) -> torch.nn.Module:
    factory = import_object(spec, "the distillation student", "the function returns a torch.nn.Module")
    module = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(module, torch.nn.Module):
        raise OnnxoptError(f"student {spec} returned {type(module).__name__}, not a torch.nn.Module",
                           "return the module itself (built, with its initial weights)")
    return module


class Student(torch.nn.Module):
    """The user's module, called with the feeds in its `forward`'s order, returning the teacher's
    outputs as a tuple (the form the exporter and the training loop both take)."""

    def __init__(self, module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.module, self.output_names = module, list(output_names)
        parameters = list(inspect.signature(module.forward).parameters.values())
        self.input_names = []
        for p in parameters:  # positional order; a trailing parameter the data lacks keeps its default
            if p.name not in input_names:
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    raise OnnxoptError(f"the student's forward takes '{p.name}', which the teacher has no input for",
                                       f"name its parameters like the teacher's inputs: {', '.join(input_names)}")
                break
            self.input_names.append(p.name)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        if isinstance(out, Mapping) or hasattr(out, "keys"):
            missing = [n for n in self.output_names if n not in out.keys()]
            if missing:
                raise OnnxoptError(f"the student's outputs have no {', '.join(missing)}",
                                   "return the teacher's outputs by name, or as a tuple in its order")
            return tuple(out[n] for n in self.output_names)
        if len(out) < len(self.output_names):
            raise OnnxoptError(f"the student returns {len(out)} outputs, the teacher has {len(self.output_names)}")
        return tuple(out[: len(self.output_names)])

    def by_name(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.output_names, self(*(feeds[n] for n in self.input_names))))


def export(student: Student, teacher: onnx.ModelProto, example: dict[str, torch.Tensor],
           pairs: Sequence[tuple[str, str]] = ()) -> onnx.ModelProto:
    """The trained student as ONNX: the teacher's I/O names (its graph outputs only, whatever hidden
    states were matched: `pairs` says which student output each came from), its dynamic axes, its
    opset (the TorchScript exporter's, which keeps plain ops at old opsets too)."""
    opset = next((o.version for o in teacher.opset_import if o.domain in ("", "ai.onnx")), 17)
    names = [o.name for o in teacher.graph.output]
    from_student = {t: s for s, t in pairs}
    student.output_names = [from_student.get(name, name) for name in names]
    axes = {}
    for vi in [*teacher.graph.input, *teacher.graph.output]:
        dynamic = {i: d.dim_param or f"{vi.name}_{i}" for i, d in enumerate(vi.type.tensor_type.shape.dim)
                   if not d.HasField("dim_value")}
        if dynamic:
            axes[vi.name] = dynamic
    student.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "student.onnx"
        try:
            torch.onnx.export(student, tuple(example[n] for n in student.input_names), str(path), dynamo=False,
                              opset_version=min(max(opset, 7), 20), input_names=student.input_names,
                              output_names=names, dynamic_axes=axes, do_constant_folding=True)
        except Exception as exc:  # the exporter's errors are many and long: the first line says which op
            raise OnnxoptError(f"distill: torch.onnx.export failed on the student: {str(exc).splitlines()[0]}",
                               "export the student yourself once to see the whole message") from exc
        return onnx.load(str(path))
