"""What the student is trained towards, beyond "the teacher's graph outputs under the same names".

- Pairs (`outputs=student=teacher`): a student tensor matched to a teacher tensor of another name,
  for layer-wise (hidden-state) distillation of a student whose tensors are named otherwise (a
  smaller student's layer 1 against the teacher's layer 2).
- Top k (`top_k=k`): the teacher's class scores are cut to their k largest before caching (a TopK
  node appended to a copy of the teacher), so a cache over many classes holds k values and k class
  indices per sample instead of every score. The loss is the KL divergence over those k classes:
  the teacher's distribution renormalized over them, the student's log-probabilities (over all its
  classes) read at them, so the student is pulled towards the teacher's top classes and away from
  the rest.
- Hard labels (`labels=KEY`): class labels held in the training data under KEY, mixed into the loss
  by cross-entropy on the class-score output. The data service checks them like an input: the
  model it validates against gets KEY as one more int64 input with a sample axis.
"""
from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto, helper

from onnxopt import OnnxoptError

TOP_K_VALUES, TOP_K_INDICES = "/top_k_values", "/top_k_indices"


def output_pairs(spec: str) -> list[tuple[str, str]]:
    """(student tensor, teacher tensor) for each ';'-separated item: NAME matches NAME,
    STUDENT=TEACHER matches two names."""
    pairs = []
    for item in filter(None, (i.strip() for i in spec.split(";"))):
        student, _, teacher = item.partition("=")
        student, teacher = student.strip(), (teacher if "=" in item else student).strip()
        if not student or not teacher:
            raise OnnxoptError(f"distill:outputs: '{item}' leaves a side empty", "write NAME or STUDENT=TEACHER")
        pairs.append((student, teacher))
    for side, names in (("student", [s for s, _ in pairs]), ("teacher", [t for _, t in pairs])):
        twice = [name for name, count in Counter(names).items() if count > 1]
        if twice:
            raise OnnxoptError(f"distill:outputs names the {side} tensor '{twice[0]}' twice",
                               "match each tensor once")
    return pairs


def _declared(model: onnx.ModelProto, name: str) -> tuple[int, list | None]:
    """(element type, shape with None for dynamic dimensions) as `model` declares `name`."""
    for vi in [*model.graph.output, *model.graph.value_info]:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return vi.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else None
                                                   for d in vi.type.tensor_type.shape.dim]
    return TensorProto.FLOAT, None


def with_top_k(teacher: onnx.ModelProto, names: list[str], k: int) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of `teacher` that also outputs the top k of each of `names` declared [batch, classes],
    and {name: (values output, indices output)}."""
    scores = [name for name in names if (shape := _declared(teacher, name)[1]) is not None and len(shape) == 2]
    if not scores:
        raise OnnxoptError("distill:top_k: none of the matched teacher tensors is declared [batch, classes]",
                           "drop top_k, or match the teacher's class-score output")
    for name in scores:
        classes = _declared(teacher, name)[1][1]
        if classes is not None and classes < k:
            raise OnnxoptError(f"distill:top_k={k}: '{name}' has only {classes} classes", f"give top_k <= {classes}")
    copy = onnx.ModelProto()
    copy.CopyFrom(teacher)
    opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), 1)
    cut = {}
    for name in scores:
        values, indices = f"{name}{TOP_K_VALUES}", f"{name}{TOP_K_INDICES}"
        if opset >= 10:  # K became an input in opset 10
            k_name = f"{name}/top_k_k"
            copy.graph.initializer.append(helper.make_tensor(k_name, TensorProto.INT64, [1], [k]))
            node = helper.make_node("TopK", [name, k_name], [values, indices], name=f"{name}/top_k", axis=-1)
        else:
            node = helper.make_node("TopK", [name], [values, indices], name=f"{name}/top_k", axis=-1, k=k)
        copy.graph.node.append(node)
        copy.graph.output.extend([helper.make_tensor_value_info(values, _declared(teacher, name)[0], None),
                                  helper.make_tensor_value_info(indices, TensorProto.INT64, None)])
        cut[name] = (values, indices)
    return copy, cut


def with_label_input(model: onnx.ModelProto, key: str) -> onnx.ModelProto:
    """A copy of `model` that also takes `key` as an int64 [samples] input (unused by any node), so
    that the data service batches, orders and checks the labels with the inputs."""
    if key in {vi.name for vi in model.graph.input}:
        raise OnnxoptError(f"distill:labels={key} is one of the model's inputs", "name the labels' own array")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.input.append(helper.make_tensor_value_info(key, TensorProto.INT64, ["labels"]))
    return copy
