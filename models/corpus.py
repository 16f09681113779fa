"""Real English sentences available offline: docstring summaries from the Python standard library.

Used as calibration and evaluation text for the MiniLM sentence encoder. Each sentence is the
first sentence of a docstring's first prose paragraph (C signature lines skipped), taken from a
fixed, sorted list of stdlib modules and their public functions, classes and methods, walked in a
deterministic order and deduplicated. Slices such as ``sentences(160)`` (calibration) and
``sentences(300, offset=1000)`` (evaluation) are therefore disjoint and stable for a given Python.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import lru_cache

MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "bz2",
    "calendar", "cmd", "codecs", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email", "enum",
    "fnmatch", "fractions", "functools", "gc", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "http.client", "inspect", "io", "itertools", "json", "locale",
    "logging", "lzma", "math", "mimetypes", "mmap", "multiprocessing", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "platform", "plistlib", "pprint",
    "queue", "quopri", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil",
    "signal", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "xml.etree.ElementTree", "zipfile", "zlib",
])

MIN_LEN, MAX_LEN = 20, 300
MIN_COUNT = 1300
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def _is_prose(sentence: str) -> bool:
    return (
        MIN_LEN <= len(sentence) <= MAX_LEN
        and " " in sentence
        and sentence[0].isalpha()
        and not _SIGNATURE.match(sentence)
        and ">>>" not in sentence
        and sum(c.isalpha() for c in sentence) >= 0.6 * len(sentence)
    )


def _summary(doc: object) -> str | None:
    """First sentence of the first prose paragraph of a docstring."""
    if not isinstance(doc, str) or not doc.strip():
        return None
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if not lines or _SIGNATURE.match(lines[0]):
            continue
        return _SENTENCE_END.split(" ".join(lines))[0].strip()
    return None


def _own(obj: object, module) -> bool:
    """Whether `obj` belongs to `module` (or its C accelerator, e.g. _json), not re-exported from elsewhere."""
    owner = (getattr(obj, "__module__", None) or module.__name__).split(".")[0].lstrip("_")
    return owner in (module.__name__.split(".")[0], "posix", "builtins")


def _objects(module) -> list[object]:
    """The module, then its public functions/classes sorted by name, each class followed by its methods."""
    objs: list[object] = [module]
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _own(obj, module):
            continue
        objs.append(obj)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    objs.append(member)
    return objs


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    seen: set[str] = set()
    result: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name in MODULES:
            for obj in _objects(importlib.import_module(mod_name)):
                sentence = _summary(getattr(obj, "__doc__", None))
                if sentence and _is_prose(sentence) and sentence not in seen:
                    seen.add(sentence)
                    result.append(sentence)
    if len(result) < MIN_COUNT:
        raise RuntimeError(f"only {len(result)} corpus sentences found, need {MIN_COUNT}")
    return tuple(result)


def sentences(n: int, offset: int = 0) -> list[str]:
    """`n` distinct English sentences starting at `offset`; raises ValueError if fewer exist."""
    pool = _all_sentences()
    if n < 0 or offset < 0 or offset + n > len(pool):
        raise ValueError(f"requested sentences[{offset}:{offset + n}] but only {len(pool)} exist")
    return list(pool[offset : offset + n])


@lru_cache(maxsize=1)
def _training_pool() -> tuple[str, ...]:
    """Sentences of the comments and docstrings of the stdlib's own source files, walked in sorted
    order: many more than the summaries, and none of them (so disjoint from calibration, evaluation
    and dev slices)."""
    import ast
    import io
    import sysconfig
    import tokenize
    from pathlib import Path

    excluded = set(_all_sentences())
    seen: set[str] = set()
    result: list[str] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    for path in sorted(p for p in root.rglob("*.py") if not skipped & set(p.relative_to(root).parts)):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue
        texts = [ast.get_docstring(node, clean=True) for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        comment: list[str] = []
        for token in tokens + [None]:  # consecutive comment lines form one paragraph
            if token is not None and token.type == tokenize.COMMENT:
                comment.append(token.string.lstrip("#").strip())
            elif token is None or token.type not in (tokenize.NL, tokenize.NEWLINE):
                if comment:
                    texts.append(" ".join(comment))
                comment = []
        for text in texts:
            for paragraph in re.split(r"\n\s*\n", text or ""):
                joined = " ".join(line.strip() for line in paragraph.splitlines())
                for sentence in _SENTENCE_END.split(joined):
                    sentence = sentence.strip()
                    if _is_prose(sentence) and sentence not in seen and sentence not in excluded:
                        seen.add(sentence)
                        result.append(sentence)
    return tuple(result)


def training_sentences(n: int) -> list[str]:
    """`n` sentences for training (distillation), disjoint from every `sentences()` slice."""
    pool = _training_pool()
    if n > len(pool):
        raise ValueError(f"requested {n} training sentences but only {len(pool)} exist")
    return list(pool[:n])


def count() -> int:
    """How many sentences are available."""
    return len(_all_sentences())


if __name__ == "__main__":
    print(f"{count()} sentences from {len(MODULES)} stdlib modules")
    for i in (0, 1, 159, 1000, 1299):
        print(f"[{i}] {sentences(1, i)[0]}")
