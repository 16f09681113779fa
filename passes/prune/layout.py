"""The channel-group walk's rules for ops that move channels between axes and ranges without
computing on them: Reshape and Flatten (split or merge an axis: heads), Squeeze/Unsqueeze, Expand
(grouped-query attention's repeated key/value heads), Concat, Split and Slice along the channel axis
(fused Q/K/V and gate/up projections) or along others (rotary embeddings), and Gather from a table
(T5's per-head position bias). `groups._Finder` mixes them in; each returns the slots a node ties to
the one it was reached by, with their widths (see groups.py), or raises Blocked.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx

from onnxopt.graph import GraphView, attribute

from .targets import evaluated_ints, size_read, split_sizes, target_entry, target_piece
from .units import Blocked, SliceBounds, Slot, SplitAcross


class LayoutRules:
    """Mixed into groups._Finder, whose walk state (view, dims, the seed, the Splits, Slices and size
    reads met) these rules read and record into."""

    def _slice(self, node, slot: Slot, width: Fraction, position, same) -> list:
        """A Slice along other axes than the channel's (rotary embeddings split each head's dims in
        halves): the channel axis passes through."""
        if position and position[0] > 0:
            raise Blocked("it reaches a Slice's bounds")
        if len(node.input) > 1:  # opset >= 10: starts, ends, axes as inputs
            starts = self.view.constant(node.input[1])
            axes = self.view.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else \
                None if starts is None else np.arange(starts.size)
        else:
            axes = attribute(node, "axes", None) or list(range(len(attribute(node, "starts", []))))
        if axes is None:
            raise Blocked("Slice with computed axes")
        rank = self._rank(node.input[0])
        if slot.axis in {int(a) % rank for a in np.atleast_1d(axes)}:
            return self._slice_along(node, slot, width, [int(a) % rank for a in np.atleast_1d(axes)])
        return [same(node.input[0], slot.axis), same(node.output[0], slot.axis)]

    def _slice_along(self, node, slot: Slot, width: Fraction, axes: list[int]) -> list:
        """A Slice of the channel axis (Phi-3 cuts Q, K and V, and gate and up, out of fused projections
        so): its output is the range [start, end) of the input's axis, as a Split's output is; channels
        outside it do not reach it. Its bounds are recomputed when the group shrinks."""
        bounds = self._slice_range(node, axes.index(slot.axis), self._dim(node.input[0], slot.axis)) \
            if len(axes) == 1 else None
        if bounds is None:
            raise Blocked("Slice cuts that axis (bounds computed, or several axes or steps)")
        start, end = bounds
        self._slices[id(node)] = SliceBounds(node, slot.axis, start, end, self._dim(node.input[0], slot.axis))
        if slot.tensor in node.output:
            return [(Slot(node.input[0], slot.axis, slot.lo + start, slot.hi + start), width)]
        if slot.hi <= start or slot.lo >= end:
            return []  # none of these channels is in the slice
        if start <= slot.lo and slot.hi <= end:
            return [(Slot(node.output[0], slot.axis, slot.lo - start, slot.hi - start), width)]
        seed = self._seed
        if (slot.lo, slot.hi) == (seed.lo, seed.hi) and width == 1:
            raise SplitAcross([c - slot.lo for c in (start, end) if slot.lo < c < slot.hi])
        raise Blocked("Slice cuts a unit of the group")

    def _slice_range(self, node, position: int, size) -> tuple[int, int] | None:
        """[start, end) of a Slice along one axis of size `size`, step 1: its bounds constant, or computed
        from known dims (a plain export's chunk(); shrink writes them as constants then, the axis' size
        being fixed by the weights)."""
        if len(node.input) < 3 or not isinstance(size, int):
            return None
        starts, ends = (evaluated_ints(node.input[i], self.view, self.dims) for i in (1, 2))
        steps = self.view.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None or (steps is not None and int(steps.reshape(-1)[position]) != 1):
            return None
        start, end = int(starts.reshape(-1)[position]), int(ends.reshape(-1)[position])
        start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
        return max(0, min(start, size)), max(0, min(end, size))

    def _gather(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        """Gather(data, indices) along axis a: the output's axes are data's before a, then the indices',
        then data's after a. An axis of data other than a passes through (T5 looks up each head's
        relative position bias in a [buckets, heads] table); the gathered axis and the indices' axes
        hold rows, not channels."""
        data, indices, out = node.input[0], node.input[1], node.output[0]
        rank = self._rank(data)
        axis = attribute(node, "axis", 0) % rank
        added = self._rank(indices) - 1  # the output has this many more axes than data
        if slot.tensor == indices:
            raise Blocked("it reaches a Gather's indices")
        if is_output:
            data_axis = slot.axis if slot.axis < axis else slot.axis - added if slot.axis > axis + added else None
        else:
            data_axis = slot.axis if slot.axis != axis else None
        if data_axis is None or data_axis == axis:
            raise Blocked("Gather picks along that axis")
        out_axis = data_axis if data_axis < axis else data_axis + added
        return [(Slot(data, data_axis, slot.lo, slot.hi), width), (Slot(out, out_axis, slot.lo, slot.hi), width)]

    def _expand(self, node, slot: Slot, width: Fraction, is_output: bool, reshapes) -> list:
        """Expand broadcasts its input to a target shape; an axis on which the input holds the channels
        keeps them (grouped-query attention repeats each key/value head for its query heads this way).
        The target's entry there is 1 (the input's size), a constant that shrinks with the group, or
        the size of a tensor of the group read at run time (checked when the walk ends)."""
        x, out = node.input[0], node.output[0]
        rank_x, rank_out = self._rank(x), self._rank(out)
        out_axis = slot.axis if is_output else slot.axis + rank_out - rank_x
        in_axis = out_axis - (rank_out - rank_x)
        if in_axis < 0 or self._dim(x, in_axis) == 1:
            raise Blocked("Expand broadcasts the channel axis")
        target_dims = self.dims.get(node.input[1])
        length = target_dims[0] if target_dims and isinstance(target_dims[0], int) else rank_out
        b = out_axis - (rank_out - length)
        if b >= 0 and self._constant_target(node, b):  # met from either side: once per output range, in walk
            reshapes.append((node, b, width, slot.lo, slot.hi))
        return [(Slot(out, out_axis, slot.lo, slot.hi), width), (Slot(x, in_axis, slot.lo, slot.hi), width)]

    def _flatten(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        if attribute(node, "axis", 1) != 1:
            raise Blocked("Flatten at another axis than 1")
        dims = self.dims.get(node.input[0])
        if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims[2:]):
            raise Blocked("Flatten of a tensor whose spatial size is unknown")
        spatial = int(np.prod(dims[2:])) if len(dims) > 2 else 1
        if is_output:
            if slot.axis != 1 or slot.lo % spatial or slot.hi % spatial:
                raise Blocked("Flatten's output is cut inside a channel")
            return [(Slot(node.input[0], 1, slot.lo // spatial, slot.hi // spatial), width / spatial)]
        if slot.axis != 1:
            raise Blocked("Flatten merges that axis")
        return [(Slot(node.output[0], 1, slot.lo * spatial, slot.hi * spatial), width * spatial)]

    def _reshape(self, node, slot: Slot, width: Fraction, is_output: bool, reshapes) -> list:
        """A reshape that keeps the axis, splits it into (outer, inner) or merges (outer, inner) into it,
        with every dim before it unchanged."""
        source, result = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if source is None or result is None:
            raise Blocked("Reshape whose shapes are unknown")
        if is_output:
            return self._reshape_back(node, slot, width, source, result)
        a = slot.axis
        for b in range(len(result) + 1):
            if b < len(result) and result[b] == 1:
                continue  # an axis of size 1 holds no group (dims of 1 make the products below ambiguous)
            if list(result[:b]) != list(source[:a]) and not _same_product(result[:b], source[:a]):
                continue
            rest_in, rest_out = source[a + 1:], result[b + 1:] if b < len(result) else ()
            d = source[a]
            if b < len(result) and result[b] == d and _same_product(rest_in, rest_out):
                if self._constant_target(node, b):
                    reshapes.append((node, b, width, slot.lo, slot.hi))
                return [(Slot(node.output[0], b, slot.lo, slot.hi), width)]
            if b + 1 < len(result) and isinstance(d, int) and isinstance(result[b], int) and \
                    isinstance(result[b + 1], int) and result[b] * result[b + 1] == d and \
                    _same_product(rest_in, result[b + 2:]):  # split: [.., H * D] -> [.., H, D]
                inner = result[b + 1]
                if slot.lo % inner or slot.hi % inner:
                    raise Blocked("Reshape splits the axis inside a unit")
                self._reshaped = True
                if self._constant_target(node, b):
                    reshapes.append((node, b, width / inner, slot.lo // inner, slot.hi // inner))
                return [(Slot(node.output[0], b, slot.lo // inner, slot.hi // inner), width / inner)]
            if b < len(result) and _norm_groups(d, result[b], rest_in, rest_out):  # GroupNorm: [.., C, H, W] -> [.., G, -1]
                inner = d // result[b]
                if slot.lo % inner or slot.hi % inner:
                    raise Blocked("Reshape splits the axis inside a unit")
                if self._constant_target(node, b):
                    reshapes.append((node, b, width / inner, slot.lo // inner, slot.hi // inner))
                return [(Slot(node.output[0], b, slot.lo // inner, slot.hi // inner), width / inner)]
            inner = _merged(source, a, d, result[b] if b < len(result) else None, rest_out)
            if inner:  # merge: [.., H, D...] -> [.., H * D...] (a flatten written as a Reshape, too)
                self._reshaped = True
                if self._constant_target(node, b):
                    reshapes.append((node, b, width * inner, slot.lo * inner, slot.hi * inner))
                return [(Slot(node.output[0], b, slot.lo * inner, slot.hi * inner), width * inner)]
            if b < len(result) and _norm_groups(result[b], d, rest_out, rest_in):  # GroupNorm's way back (after merges)
                inner = result[b] // d
                if self._constant_target(node, b):
                    reshapes.append((node, b, width * inner, slot.lo * inner, slot.hi * inner))
                return [(Slot(node.output[0], b, slot.lo * inner, slot.hi * inner), width * inner)]
        raise Blocked("Reshape mixes the channel axis with others")

    def _constant_target(self, node, b: int) -> bool:
        """Whether the Reshape's (or Expand's) target entry at the channel axis is a constant that must
        shrink with the group (-1 and 0, an Expand's 1, and the run-time size of a tensor of the group,
        checked when the walk ends, follow by themselves)."""
        entry = target_entry(node, b, self.view)
        if entry is not None:
            return entry[2] > 1
        whole = self.view.producer.get(node.input[1])
        if whole is not None and whole.op_type == "Shape" and not attribute(whole, "start", 0) and \
                attribute(whole, "end", None) is None:  # x.shape, all of it (GroupNorm's way back)
            self._size_reads.append((whole.input[0], b))
            return False
        read = size_read(target_piece(node, b, self.view), self.view, self.dims)
        if read is None:
            raise Blocked(f"{node.op_type}'s target size at the channel axis is computed")
        self._size_reads.append(read)
        return False

    def _reshape_back(self, node, slot: Slot, width: Fraction, source, result) -> list:
        b = slot.axis
        for a in range(len(source)):
            if source[a] == 1:
                continue  # an axis of size 1 holds no group: [2, 1, 4, 32] -> [2, 1, 128] merges axis 2, not 1
            if not (list(source[:a]) == list(result[:b]) or _same_product(source[:a], result[:b])):
                continue
            d = result[b]
            if source[a] == d and _same_product(source[a + 1:], result[b + 1:]):
                return [(Slot(node.input[0], a, slot.lo, slot.hi), width)]
            if _norm_groups(source[a], d, source[a + 1:], result[b + 1:]):  # the output's G of the input's C
                inner = source[a] // d
                return [(Slot(node.input[0], a, slot.lo * inner, slot.hi * inner), width * inner)]
            if _norm_groups(d, source[a], result[b + 1:], source[a + 1:]):  # the output's C of the input's G
                inner = d // source[a]
                if slot.lo % inner or slot.hi % inner:
                    raise Blocked("Reshape merges the axis inside a unit")
                return [(Slot(node.input[0], a, slot.lo // inner, slot.hi // inner), width / inner)]
            inner = _merged(source, a, source[a], d, result[b + 1:])
            if inner:  # the output axis merges (H, D...): back to H
                if slot.lo % inner or slot.hi % inner:
                    raise Blocked("Reshape merges the axis inside a unit")
                return [(Slot(node.input[0], a, slot.lo // inner, slot.hi // inner), width / inner)]
            if b + 1 < len(result) and all(isinstance(x, int) for x in (d, source[a], result[b + 1])) and \
                    d * result[b + 1] == source[a]:  # the output splits the input's axis: H of (H, D)
                inner = result[b + 1]
                return [(Slot(node.input[0], a, slot.lo * inner, slot.hi * inner), width * inner)]
        raise Blocked("Reshape mixes the channel axis with others")

    def _squeeze(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        axes = _axes(node, self.view)
        if axes is None:
            raise Blocked(f"{node.op_type} without constant axes")
        if node.op_type == "Squeeze":
            rank_in = self._rank(node.input[0])
            axes = sorted(a % rank_in for a in axes)
            kept = [i for i in range(rank_in) if i not in axes]
        else:
            rank_out = self._rank(node.output[0])
            axes = sorted(a % rank_out for a in axes)
            kept = [i for i in range(rank_out) if i not in axes]
        if node.op_type == "Squeeze":
            if is_output:
                return [(Slot(node.input[0], kept[slot.axis], slot.lo, slot.hi), width)]
            return [(Slot(node.output[0], kept.index(slot.axis), slot.lo, slot.hi), width)]
        if is_output:
            return [(Slot(node.input[0], kept.index(slot.axis), slot.lo, slot.hi), width)]
        return [(Slot(node.output[0], kept[slot.axis], slot.lo, slot.hi), width)]

    def _concat(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        rank = self._rank(node.output[0])
        axis = attribute(node, "axis", 0) % rank
        if slot.axis != axis:
            return [(Slot(n, slot.axis, slot.lo, slot.hi), width) for n in [*node.input, *node.output]]
        offsets, start = [], 0
        for name in node.input:
            size = self._dim(name, axis)
            if not isinstance(size, int):
                raise Blocked("Concat of inputs whose size is unknown")
            offsets.append((name, start, start + size))
            start += size
        if is_output:
            for name, lo, hi in offsets:
                if lo <= slot.lo and slot.hi <= hi:
                    return [(Slot(name, axis, slot.lo - lo, slot.hi - lo), width)]
            raise Blocked("Concat's output is cut across its inputs")
        lo = next(lo for name, lo, _ in offsets if name == slot.tensor)
        return [(Slot(node.output[0], axis, lo + slot.lo, lo + slot.hi), width)]

    def _split(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        """A Split along another axis passes the channels through; along theirs, each output is a range
        of the input's axis (as a Concat's inputs are of its output), and its size shrinks with the group."""
        rank = self._rank(node.input[0])
        axis = attribute(node, "axis", 0) % rank
        if slot.axis != axis:
            return [(Slot(n, slot.axis, slot.lo, slot.hi), width) for n in [node.input[0], *node.output]]
        sizes = split_sizes(node, self.view, self._dim(node.input[0], axis))
        if sizes is None:
            raise Blocked("Split of sizes unknown here")
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        if is_output:
            i = list(node.output).index(slot.tensor)
            self._splits.append((node, i, width, tuple(sizes)))
            return [(Slot(node.input[0], axis, starts[i] + slot.lo, starts[i] + slot.hi), width)]
        for i, (lo, hi) in enumerate(zip(starts, starts[1:])):
            if lo <= slot.lo and slot.hi <= hi:
                self._splits.append((node, i, width, tuple(sizes)))
                return [(Slot(node.output[i], axis, slot.lo - lo, slot.hi - lo), width)]
        seed = self._seed
        if (slot.lo, slot.hi) == (seed.lo, seed.hi) and width == 1:  # the seed's own axis, cut into parts
            raise SplitAcross([c - slot.lo for c in starts[1:-1] if slot.lo < c < slot.hi])
        raise Blocked("Split cuts a unit of the group")

def _axes(node: onnx.NodeProto, view: GraphView) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = view.constant(node.input[1])
        return None if value is None else [int(v) for v in np.atleast_1d(value)]
    axes = attribute(node, "axes", None)
    return list(axes) if axes is not None else None


def _merged(source, a: int, d, merged, rest_out) -> int | None:
    """The product of the axes after `a` that a Reshape merges into axis a (size `d`) to make one axis of
    size `merged`, followed by `rest_out`; None when it does not merge so. [N, C, H, W] -> [N, C * H * W]
    merges H * W: channel c becomes the columns c * H * W ... (c + 1) * H * W - 1."""
    if not isinstance(d, int) or not isinstance(merged, int):
        return None
    inner = 1
    for k in range(a + 1, len(source)):
        if not isinstance(source[k], int):
            return None
        inner *= source[k]
        if d * inner == merged and _same_product(source[k + 1:], rest_out):
            return inner
    return None


def _norm_groups(whole, part, rest_whole, rest_part) -> bool:
    """Whether an axis of size `whole` followed by `rest_whole` becomes `part` groups followed by
    `rest_part`, each group's whole // part channels merged into the first axis after it, as GroupNorm's
    export writes it: [N, C, H, W] -> [N, G, C / G * H * W], normalized per group, then back."""
    if not isinstance(whole, int) or not isinstance(part, int) or part <= 1 or whole <= part or whole % part:
        return False
    inner = whole // part
    return bool(rest_part) and isinstance(rest_part[0], int) and rest_part[0] % inner == 0 and \
        _same_product([inner, *rest_whole], rest_part)


def _same_product(a, b) -> bool:
    """Whether two lists of dims (ints or symbols) hold the same elements: equal leading or trailing
    shapes across a reshape."""
    ints_a = int(np.prod([d for d in a if isinstance(d, int)])) if a else 1
    ints_b = int(np.prod([d for d in b if isinstance(d, int)])) if b else 1
    symbols_a = sorted(str(d) for d in a if not isinstance(d, int))
    symbols_b = sorted(str(d) for d in b if not isinstance(d, int))
    return ints_a == ints_b and symbols_a == symbols_b and None not in a and None not in b
