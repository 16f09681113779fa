"""A third-party pass in one file, as a user would write it, loaded with `--plugin`.

It renames every node to upper case (unnamed nodes get `OPTYPE_<index>`), optionally appends a suffix
and stamps a doc_string. Node names carry no semantics, so the model computes exactly the same thing.
"""
import dataclasses

from onnxopt import Pass, PassResult, option


@dataclasses.dataclass(frozen=True)
class ShoutOptions:
    suffix: str = option("", "text appended to every renamed node")
    doc: bool = option(False, "also set each node's doc_string to 'shouted by onnxopt'")


class ShoutPass(Pass):
    """Rename every node to upper case (a test plugin)."""

    name = "shout"
    Options = ShoutOptions

    def run(self, model, ctx):
        renamed = 0
        for index, node in enumerate(model.graph.node):
            new = (node.name or f"{node.op_type}_{index}").upper() + self.options.suffix
            if new != node.name:
                node.name = new
                renamed += 1
            if self.options.doc:
                node.doc_string = "shouted by onnxopt"
        return PassResult(model, changed=renamed > 0 or self.options.doc, counts={"renamed": renamed})
