"""One teacher-output cache fill for MiniLM in a fresh process, so its peak RSS is its own.

usage: _teacher_child.py CACHE_DIR SENTENCES [INTERRUPT_AT]   -> prints one JSON line

With INTERRUPT_AT the process sends itself SIGINT (what Ctrl-C sends) when that batch starts; the
fill stops as a user's would, and a later run resumes it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _quant_child import peak_rss_mb  # noqa: E402


def main() -> None:
    # Ctrl-C's handler, as in a terminal: a shell starting a job in the background sets SIGINT to ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cache_dir, sentences = sys.argv[1], int(sys.argv[2])
    interrupt_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    import onnx

    from models import minilm
    from onnxopt.cache import Cache
    from onnxopt.data import RepresentativeData
    from onnxopt.teacher import teacher_outputs

    teacher = onnx.load(str(minilm.build()))
    batches = RepresentativeData(str(minilm.training_npz(sentences))).batches(teacher, 32, trim_padding=True)

    def progress(items, desc, unit="it", total=None, status=None):
        for i, item in enumerate(items):
            if i == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    start = time.perf_counter()
    try:
        _, facts = teacher_outputs(teacher, batches, Cache(cache_dir), progress=progress)
        result = {"interrupted": False, **facts}
    except KeyboardInterrupt:
        result = {"interrupted": True}
    result.update(wall_seconds=time.perf_counter() - start, peak_mb=peak_rss_mb())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
