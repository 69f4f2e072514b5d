"""The one exception family for expected failures; each carries its exit code.

cli.main() prints these as a single `error: ...` line. Anything else is a bug and
keeps its traceback.
"""


class PipelineError(Exception):
    """Expected failure: bad input, missing prerequisite, unreachable mirror."""

    exit_code = 1


class UsageError(PipelineError):
    """Settings that cannot work together, found after parsing (e.g. a batch that does not split over the ranks)."""

    exit_code = 2


class BelowThreshold(PipelineError):
    """infer: the evaluated accuracy does not pass the gate, so no results are written."""

    exit_code = 3


class NotEvaluated(PipelineError):
    """The current checkpoint, or its evaluation, is not there yet (predict exits 3 like a failed gate)."""

    exit_code = 3


class Busy(PipelineError):
    """Another train holds the volume's train lock."""

    exit_code = 4


class Interrupted(PipelineError):
    """SIGTERM or SIGINT arrived; whatever could be kept was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line, shortened: enough for a one-line `error:`."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."
