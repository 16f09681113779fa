"""Command line: `onnxopt MODEL -p fold,fuse -o OUT`, `onnxopt passes`, `onnxopt inspect MODEL`.

Every user error is one line on stderr and a non-zero exit; a traceback only with --debug.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Sequence

from .errors import OnnxoptError, PassFailedError, SettingError

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise OnnxoptError(f"{message}", f"see {self.prog} --help")


def _optimize_parser() -> argparse.ArgumentParser:
    from .settings import add_flags

    p = _Parser(prog="onnxopt", description="Optimize an ONNX model with a pipeline of passes. "
                "Other commands: 'onnxopt passes', 'onnxopt settings', 'onnxopt inspect MODEL', 'onnxopt compare A B --data D', "
                "'onnxopt distill TEACHER --student M:F --train D'.")
    p.add_argument("model", help="input .onnx file")
    p.add_argument("-p", "--passes", help="pipeline, e.g. fold,fuse or quant:method=entropy")
    p.add_argument("-c", "--config", help="pipeline config file (.toml or .yaml): passes and run settings")
    add_flags(p)
    p.add_argument("--ops", action="store_true", help="show node counts by op type")
    p.add_argument("--debug", action="store_true", help="show tracebacks and pass logs")
    return p


def _simple_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"onnxopt {prog}", description=description)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that temporary files are removed on the way out."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(name)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(argv, debug)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str], debug: bool) -> int:
    try:
        command = COMMANDS.get(argv[0]) if argv else None
        rc = command(argv[1:]) if command else cmd_optimize(argv)
        sys.stdout.flush()  # a reader that left shows up here, inside the handlers, not at interpreter exit
        return rc
    except PassFailedError as exc:
        if debug:
            raise
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except OnnxoptError as exc:
        if debug:
            raise
        if isinstance(exc, SettingError):  # name the setting as a flag: the user is on the command line
            from .settings import RunSettings

            exc.hint = f"pass {RunSettings.flag(exc.setting)} {exc.example}"
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnxopt: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except Terminated:
        print("onnxopt: terminated; no output was left half-written", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `onnxopt inspect M | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        if debug:
            raise
        print("onnxopt: error: out of memory (the model, its inputs or a pass needed more than this machine has)",
              file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"onnxopt: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def cmd_optimize(argv: list[str]) -> int:
    from .api import optimize
    from .pipeline import load_config
    from .report import render
    from .settings import RunSettings

    args = _optimize_parser().parse_args(argv)
    passes, settings = load_config(args.config) if args.config else (None, RunSettings())
    given = {f.name: getattr(args, f.name) for f in RunSettings.fields() if getattr(args, f.name) is not None}
    if "shapes" in given:  # --shape adds to the config's shapes
        given["shapes"] = {**settings.shapes, **RunSettings.build({"shapes": given["shapes"]}, "--shape").shapes}
    settings = RunSettings.build(given, "command line", base=settings)
    if args.config:
        from .api import check_outputs

        check_outputs(RunSettings(output=settings.output, report=settings.report), None,
                      other_inputs=(("the config", Path(args.config)),))
    passes = args.passes or passes
    if not passes:
        raise OnnxoptError("no passes given", "use -p fold,fuse or -c pipeline.toml; 'onnxopt passes' lists them")
    _, report = optimize(args.model, passes, settings)
    print(render(report, show_ops=args.ops))
    if settings.output:
        print(f"\nwrote {settings.output}")
    return 0


def cmd_passes(argv: list[str]) -> int:
    from .options import describe
    from .registry import all_passes, load_plugin

    p = _simple_parser("passes", "List every registered pass with its options.")
    p.add_argument("--plugin", action="append", default=[], help="a .py file defining extra passes")
    p.add_argument("--markdown", action="store_true", help="as the README's tables of passes and options")
    args = p.parse_args(argv)
    for plugin in args.plugin:
        load_plugin(plugin)
    if args.markdown:
        print(passes_markdown(all_passes()))
        return 0
    for name, cls in all_passes().items():
        print(f"{name}: {cls.summary()}")
        for opt, tp, default, doc in describe(cls.Options):
            print(f"    {opt} ({tp}, default {default}): {doc}")
    return 0


def passes_markdown(passes: dict) -> str:
    """Two Markdown tables, from the passes' own declarations: what each pass does, and its options."""
    from .options import describe

    lines = ["| pass | what it does |", "|---|---|"]
    lines += [f"| `{name}` | {_md(cls.summary())} |" for name, cls in passes.items()]
    lines += ["", "| option | type | default | what it sets |", "|---|---|---|---|"]
    for name, cls in passes.items():
        lines += [f"| `{name}:{opt}` | {_md(tp)} | {_md(default)} | {_md(doc)} |"
                  for opt, tp, default, doc in describe(cls.Options)]
    return "\n".join(lines)


def cmd_settings(argv: list[str]) -> int:
    from .settings import describe

    p = _simple_parser("settings", "List the run settings: command-line flags, config-file keys, optimize() keywords.")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    args = p.parse_args(argv)
    rows = describe()
    if args.markdown:
        lines = ["| flag | config / Python | type | default | what it sets |", "|---|---|---|---|---|"]
        lines += [f"| `{flag}` | `{key}`{'' if config else ' (Python only)'} | {_md(tp)} | {_md(default)} | {_md(doc)} |"
                  for flag, key, tp, default, doc, config in rows]
        print("\n".join(lines))
        return 0
    for flag, key, tp, default, doc, config in rows:
        print(f"{flag} ({key}: {tp}{', default ' + default if default else ''}): {doc}")
    return 0


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def cmd_inspect(argv: list[str]) -> int:
    from . import sparsity
    from .inputs import real_inputs
    from .model_io import load_model, loaded_with_external_data
    from .table import format_table
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
    checks = sparsity.verify(model)
    if checks:
        rows = [[c.layer[-60:], c.pattern, f"{c.recorded:.3f}", "-" if c.measured is None else f"{c.measured:.3f}",
                 "holds" if c.holds else ("layer gone" if c.measured is None else "BROKEN")] for c in checks]
        print(format_table(rows, ["sparse layer (recorded)", "pattern", "recorded", "measured", "check"]))
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
    from .data import load_feeds
    from .inputs import generate_inputs, parse_shapes
    from .model_io import load_model
    from .registry import all_passes
    from .runtime import make_session
    from .tensor_compare import compare_tensors, error_table
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
    feeds = load_feeds(args.data, reference) if args.data else generate_inputs(reference, parse_shapes(args.shape))
    views = {}  # where the candidate holds the reference's tensors, as the passes that rewrote it know
    for pass_cls in all_passes().values():
        views.update(pass_cls.tensor_views(candidate))
    errors = compare_tensors(reference, candidate, feeds, args.ep, views=views)
    agreement = compare_outputs(run(make_session(reference, args.ep), feeds), run(make_session(candidate, args.ep), feeds))
    print(error_table(errors, "", args.top).render() if errors else "no tensors in common by name")
    top1 = f", top-1 agreement {agreement.top1 * 100:.1f}%" if agreement.top1 is not None else ""
    print(f"\noutputs: max abs error {agreement.max_abs_error:.3g}, cosine {agreement.cosine:.6f}{top1}")
    return 0


def cmd_distill(argv: list[str]) -> int:
    """`onnxopt distill TEACHER.onnx --student MODULE:FUNCTION --train DATA -o OUT`: the pipeline
    `-p distill:student=...` under its own name (the pass does the work; the core only spells its name),
    followed by any passes given with -p (`-p fold,fuse,quant` compresses the student)."""
    p = _simple_parser("distill", "Train a torch student of your own on the teacher's cached outputs and export it "
                                  "to ONNX; the rest of the command line is as for optimizing.")
    p.add_argument("--student", required=True, metavar="MODULE:FUNCTION",
                   help="returns the torch.nn.Module to train (see docs/distill.md)")
    p.add_argument("--with", dest="options", default="", metavar="K=V,...",
                   help="distill options, e.g. epochs=3,lr=3e-4 (onnxopt passes lists them)")
    p.add_argument("-p", "--passes", default="", help="passes to run on the student after it is exported")
    args, rest = p.parse_known_args(argv)
    spec = ",".join(filter(None, [f"distill:student={args.student}", args.options]))
    return cmd_optimize([*rest, "-p", ",".join(filter(None, [spec, args.passes]))])


COMMANDS = {"passes": cmd_passes, "settings": cmd_settings, "inspect": cmd_inspect, "compare": cmd_compare,
            "distill": cmd_distill}

if __name__ == "__main__":
    sys.exit(main())
