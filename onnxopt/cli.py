"""Command line: `onnxopt MODEL -p fold,fuse -o OUT`, `onnxopt passes`, `onnxopt inspect MODEL`.

Every user error is one line on stderr and a non-zero exit; a traceback only with --debug.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from .errors import OnnxoptError, PassFailedError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
DEFAULTS = {"ep": "cpu", "runs": 50, "verify": "structure", "shapes": {}, "data": None, "threads": None}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise OnnxoptError(f"{message}", f"see {self.prog} --help")


def _optimize_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxopt", description="Optimize an ONNX model with a pipeline of passes. "
                "Other commands: 'onnxopt passes', 'onnxopt inspect MODEL', 'onnxopt compare A B --data D'.")
    p.add_argument("model", help="input .onnx file")
    p.add_argument("-p", "--passes", help="pipeline, e.g. fold,fuse or quant:method=entropy")
    p.add_argument("-c", "--config", help="pipeline config file (.toml or .yaml)")
    p.add_argument("-o", "--output", help="where to write the optimized model (atomic write)")
    p.add_argument("--in-place", action="store_true", help="allow -o to be the input file")
    p.add_argument("--report", help="write the report as JSON to this path")
    p.add_argument("--data", help="sample inputs: .npz named by input, or a test_data_set_* folder")
    p.add_argument("--calib", help="calibration data for passes that need it (quant)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS", help="shape of a dynamic input, e.g. input_ids=1x128")
    p.add_argument("--ep", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime execution provider (default cpu)")
    p.add_argument("--ep-fallback", action="store_true", help="warn and use CPU when the EP is unavailable")
    p.add_argument("--runs", type=int, help="timed runs per model (default 50; 0 skips timing)")
    p.add_argument("--threads", type=int, help="ORT intra-op threads for timing")
    p.add_argument("--verify", choices=["none", "structure", "numeric"], help="check after each pass (default structure)")
    p.add_argument("--no-compare", action="store_true", help="skip running the models under ORT")
    p.add_argument("--ops", action="store_true", help="show node counts by op type")
    p.add_argument("--plugin", action="append", default=[], help="a .py file defining extra passes")
    p.add_argument("--external-data", action="store_true", default=None, help="save weights as external data")
    p.add_argument("--debug", action="store_true", help="show tracebacks and pass logs")
    return p


def _simple_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"onnxopt {prog}", description=description)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        command = COMMANDS.get(argv[0]) if argv else None
        return command(argv[1:]) if command else cmd_optimize(argv)
    except PassFailedError as exc:
        if debug:
            raise
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except OnnxoptError as exc:
        if debug:
            raise
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnxopt: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"onnxopt: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def cmd_optimize(argv: list[str]) -> int:
    from .api import optimize
    from .inputs import parse_shapes
    from .model_io import check_writable
    from .pipeline import load_config
    from .report import render

    args = _optimize_parser().parse_args(argv)
    if args.report:
        check_writable(Path(args.report))
    settings = dict(DEFAULTS)
    passes = None
    if args.config:
        config = load_config(args.config)
        passes = config.pop("passes")
        settings.update({k: v for k, v in config.items() if k in DEFAULTS})
    if args.passes:
        passes = args.passes
    if not passes:
        raise OnnxoptError("no passes given", "use -p fold,fuse or -c pipeline.toml; 'onnxopt passes' lists them")
    for key in ("ep", "runs", "verify", "data", "threads"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["shapes"] = {**settings["shapes"], **parse_shapes(args.shape)}
    model, report = optimize(
        args.model, passes, output=args.output, in_place=args.in_place, ep=settings["ep"],
        ep_fallback=args.ep_fallback, data=settings["data"], shapes=settings["shapes"], runs=settings["runs"],
        compare=not args.no_compare, verify=settings["verify"], threads=settings["threads"],
        plugins=tuple(args.plugin), calibration=args.calib, external_data=args.external_data)
    print(render(report, show_ops=args.ops))
    if args.report:
        report.write_json(args.report)
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


def cmd_passes(argv: list[str]) -> int:
    from .options import describe
    from .registry import all_passes, load_plugin

    p = _simple_parser("passes", "List every registered pass with its options.")
    p.add_argument("--plugin", action="append", default=[], help="a .py file defining extra passes")
    args = p.parse_args(argv)
    for plugin in args.plugin:
        load_plugin(plugin)
    for name, cls in all_passes().items():
        print(f"{name}: {cls.summary()}")
        for opt, tp, default, doc in describe(cls.Options):
            print(f"    {opt} ({tp}, default {default}): {doc}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    from .inputs import real_inputs
    from .model_io import load_model, loaded_with_external_data
    from .report import format_table
    from .stats import model_stats

    p = _simple_parser("inspect", "Summarize a model: opset, inputs/outputs, op histogram, parameters.")
    p.add_argument("model")
    args = p.parse_args(argv)
    model = load_model(args.model)
    stats = model_stats(model)
    opsets = ", ".join(f"{i.domain or 'ai.onnx'} {i.version}" for i in model.opset_import)
    external = loaded_with_external_data(model)
    print(f"{args.model}: ir {model.ir_version}, opsets {opsets}, producer {model.producer_name or '?'} "
          f"{model.producer_version}".rstrip())
    print(f"nodes {stats.nodes}, parameters {stats.parameters:,}, size {stats.size_bytes / 2**20:.2f} MB, "
          f"external data: {'yes' if external else 'no'}")
    rows = [["input", vi.name, _type(vi)] for vi in real_inputs(model)]
    rows += [["output", vi.name, _type(vi)] for vi in model.graph.output]
    print(format_table(rows, ["", "name", "type"]))
    top = Counter(stats.ops).most_common()
    print(format_table([[op, str(n)] for op, n in top], ["op type", "count"]))
    return 0


def _type(vi) -> str:
    import onnx

    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return "non-tensor"
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{dtype}[{', '.join(dims)}]"


def cmd_compare(argv: list[str]) -> int:
    from .inputs import generate_inputs, load_data, parse_shapes
    from .model_io import load_model
    from .runtime import make_session
    from .tensor_compare import compare_tensors, render_errors
    from .validation import compare_outputs, run

    p = _simple_parser("compare", "Compare two models tensor by tensor (e.g. fp32 vs int8): worst SQNR first.")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--data", help="inputs: .npz named by input, or a test_data_set_* folder")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS", help="shape of a dynamic input")
    p.add_argument("--top", type=int, default=10, help="how many tensors to list (default 10)")
    p.add_argument("--ep", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    args = p.parse_args(argv)
    reference, candidate = load_model(args.reference), load_model(args.candidate)
    feeds = load_data(args.data, reference) if args.data else generate_inputs(reference, parse_shapes(args.shape))
    errors = compare_tensors(reference, candidate, feeds, args.ep)
    agreement = compare_outputs(run(make_session(reference, args.ep), feeds), run(make_session(candidate, args.ep), feeds))
    print(render_errors(errors, args.top) if errors else "no tensors in common by name")
    top1 = f", top-1 agreement {agreement.top1 * 100:.1f}%" if agreement.top1 is not None else ""
    print(f"\noutputs: max abs error {agreement.max_abs_error:.3g}, cosine {agreement.cosine:.6f}{top1}")
    return 0


COMMANDS = {"passes": cmd_passes, "inspect": cmd_inspect, "compare": cmd_compare}

if __name__ == "__main__":
    sys.exit(main())
