"""User-facing errors: one line saying what is wrong and what to do."""
from __future__ import annotations


class OnnxoptError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem)

    def __str__(self) -> str:
        return f"{self.problem} ({self.hint})" if self.hint else self.problem


class PassFailedError(OnnxoptError):
    """A pass produced a model that failed verification; `last_good` is the model before that pass."""

    def __init__(self, pass_name: str, reason: str, last_good=None, report=None):
        super().__init__(
            f"pass '{pass_name}' broke the model: {reason}",
            "the last good model is kept; rerun without this pass or with --debug",
        )
        self.pass_name = pass_name
        self.last_good = last_good
        self.report = report


class SettingError(OnnxoptError):
    """A run setting that a pass needs is missing. The hint names the setting the way the user gave
    the others: a flag on the command line (`--calib data.npz`), a keyword in the Python API."""

    def __init__(self, problem: str, setting: str, example: str):
        super().__init__(problem, f"set {setting}={example}")
        self.setting = setting
        self.example = example
