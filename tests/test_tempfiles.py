"""Temporary output files: a signal never strands one."""
import os
import signal
import time

import pytest

from onnxopt.tempfiles import signals_held, temporary


class Stopped(BaseException):
    pass


def _raise(signum, frame):
    raise Stopped


@pytest.fixture
def sigterm_raises():
    previous = signal.signal(signal.SIGTERM, _raise)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_inside_the_held_block_is_raised_after_it(sigterm_raises):
    import threading

    reached_end = False
    with pytest.raises(Stopped):
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # handlers get their chance here
            reached_end = True
    assert reached_end
    # the kernel may hand the signal to another thread (ONNX Runtime's pools): still held
    worker = threading.Thread(target=time.sleep, args=(0.5,))
    worker.start()
    reached_end = False
    with pytest.raises(Stopped):
        with signals_held():
            signal.pthread_kill(worker.ident, signal.SIGTERM)
            time.sleep(0.05)
            reached_end = True
    worker.join()
    assert reached_end


def test_a_signal_whose_handler_is_the_default_still_gets_its_default_action():
    import subprocess
    import sys

    code = ("import os, signal; from onnxopt.tempfiles import signals_held\n"
            "with signals_held():\n    os.kill(os.getpid(), signal.SIGTERM)\n    print('held', flush=True)\n"
            "print('not reached')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "held\n"


@pytest.mark.parametrize("directory", [False, True])
def test_the_temporary_is_removed_when_the_block_is_stopped(sigterm_raises, tmp_path, directory):
    with pytest.raises(Stopped):
        with temporary(tmp_path, ".out.onnx.", directory=directory) as path:
            assert path.exists() and path.name.startswith(".out.onnx.") and path.name.endswith(".tmp")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here
    assert list(tmp_path.iterdir()) == []


def test_a_renamed_temporary_stays_where_it_was_put(tmp_path):
    with temporary(tmp_path, ".x.") as path:
        path.write_text("done")
        os.replace(path, tmp_path / "x")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
