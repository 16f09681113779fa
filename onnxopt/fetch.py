"""Fetching intermediate values from ONNX Runtime, wherever they are computed.

ORT returns only a graph's outputs. A value of the main graph is fetched by listing it among the
outputs while the session is built. A value computed inside a subgraph (an If branch, a Loop or
Scan body) has to be carried out, level by level, in a copy of the model:
- from an If branch, as a new output of both branches (the other branch yields an empty tensor of
  the same type) and of the If node: the value when that branch ran, empty when it did not;
- from a Loop or Scan body, as a new scan output: the If/Loop/Scan node then returns the value of
  every iteration, stacked along a new first axis.
Statistics over what comes back (calibration, error tables) see every value the subgraph computed.
"""
from __future__ import annotations

import onnx
import onnxruntime as ort
from onnx import helper

from .graph import NameGenerator, infer_value_info, subgraphs
from .runtime import make_session


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def defined_values(graph: onnx.GraphProto) -> set[str]:
    """Every value `graph` and its subgraphs define: what `fetching_session` can fetch."""
    names = _defined(graph)
    for node in graph.node:
        for sub in subgraphs(node):
            names |= defined_values(sub)
    return names


def fetching_session(model: onnx.ModelProto, names, ep: str = "cpu") -> tuple[ort.InferenceSession, dict[str, str]]:
    """A session that also returns the values `names`, and each one's output name in it."""
    names = list(dict.fromkeys(names))
    top = _defined(model.graph)
    if all(n in top for n in names):  # all in the main graph: listed as outputs while the session is built
        outputs = model.graph.output
        count, present = len(outputs), {o.name for o in outputs}
        outputs.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
        try:
            return make_session(model, ep), {n: n for n in names}
        finally:
            del outputs[count:]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = infer_value_info(model)
    mapping = _lift(copy.graph, set(names), types, NameGenerator(copy.graph))
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=mapping[n]) for n in names
                             if n in mapping and mapping[n] not in present)
    return make_session(copy, ep), mapping


def _lift(graph: onnx.GraphProto, wanted: set[str], types: dict, names: NameGenerator) -> dict[str, str]:
    """{value: the name under which `graph` holds it} for the wanted values computed in `graph` or
    below it, adding outputs to the subgraphs and nodes in between."""
    here = _defined(graph)
    found = {n: n for n in wanted if n in here}
    for node in graph.node:
        bodies = subgraphs(node)
        inside = {n for n in wanted - found.keys() if any(n in defined_values(b) for b in bodies)}
        if not inside:
            continue
        lifted = [_lift(body, inside, types, names) for body in bodies]
        for value in sorted(inside):
            out = names(f"{value}__from_{node.op_type.lower()}")
            for body, held in zip(bodies, lifted):
                if value in held:
                    body.output.append(_typed(held[value], value, types))
                else:  # the If branch that does not compute it answers with an empty tensor
                    empty = names(f"{value}__empty")
                    elem = _elem_type(value, types)
                    body.node.append(helper.make_node("Constant", [], [empty], value=helper.make_tensor(
                        empty, elem, [0], [])))
                    body.output.append(helper.make_tensor_value_info(empty, elem, None))
            node.output.append(out)
            if node.op_type == "Scan":
                _extend_scan_attributes(node)
            found[value] = out
    return found


def _elem_type(value: str, types: dict) -> int:
    vi = types.get(value)
    return vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else onnx.TensorProto.FLOAT


def _typed(name: str, value: str, types: dict) -> onnx.ValueInfoProto:
    """A subgraph output's declaration: the value's element type, shape left open."""
    return helper.make_tensor_value_info(name, _elem_type(value, types), None)


def _extend_scan_attributes(node: onnx.NodeProto) -> None:
    """A Scan that lists its scan outputs' axes or directions needs an entry for the new one."""
    for attr in node.attribute:
        if attr.name in ("scan_output_axes", "scan_output_directions"):
            attr.ints.append(0)
