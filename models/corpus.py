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


def count() -> int:
    """How many sentences are available."""
    return len(_all_sentences())


if __name__ == "__main__":
    print(f"{count()} sentences from {len(MODULES)} stdlib modules")
    for i in (0, 1, 159, 1000, 1299):
        print(f"[{i}] {sentences(1, i)[0]}")
