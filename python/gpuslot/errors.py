"""The exceptions gpuslot raises: one class per kind of failure, each a subclass of the built-in
exception a Python programmer would reach for (BadInput is a ValueError, Timeout a TimeoutError).

Every exception carries ``code`` (the kind, as ``gpuslot`` names it in JSON), ``exit_code`` (what
the ``gpuslot`` command would exit with), ``message`` (one line: what was wrong and what is
accepted), and, where a GPU choice failed, ``reasons`` (one line per GPU, why it was passed over)
and ``warnings``.
"""

__all__ = [
    "GpuslotError",
    "BadInput",
    "NoGpuAvailable",
    "NvmlUnavailable",
    "StateDirectoryError",
    "Timeout",
    "WorkerInitFailed",
    "TaskFailed",
    "InternalError",
]


class GpuslotError(Exception):
    """Base of every gpuslot exception."""

    code = "internal"
    exit_code = 70

    def __init__(self, message, reasons=(), warnings=()):
        super().__init__(message)
        self.message = message
        self.reasons = list(reasons)
        self.warnings = list(warnings)

    def __str__(self):
        return self.message


class BadInput(GpuslotError, ValueError):
    """A malformed argument or setting: size, strategy, device spec, GPU that does not exist."""

    code = "bad_input"
    exit_code = 2


class NoGpuAvailable(GpuslotError, RuntimeError):
    """No visible GPU has the room now (``reasons`` says why, GPU by GPU)."""

    code = "nothing_fits"
    exit_code = 1


class NvmlUnavailable(NoGpuAvailable):
    """No NVIDIA driver (or NVML failed) where a GPU was required. A NoGpuAvailable, so code that
    falls back to the CPU when no GPU is available catches it too."""

    code = "nvml_unavailable"
    exit_code = 3


class StateDirectoryError(GpuslotError, OSError):
    """The shared lease directory (GPUSLOT_STATE_DIR) is unusable."""

    code = "state"
    exit_code = 4


class Timeout(GpuslotError, TimeoutError):
    """Waited as long as asked for room."""

    code = "timeout"
    exit_code = 124


class WorkerInitFailed(GpuslotError, RuntimeError):
    """A WorkerPool worker's ``init`` raised (other than running out of GPU memory)."""

    code = "worker_init"
    exit_code = 1


class TaskFailed(GpuslotError, RuntimeError):
    """A WorkerPool task failed for good: it raised, or it ran out of GPU memory (or its worker
    died) on every attempt. ``index`` is its position in ``map``'s input (None for ``submit``),
    ``attempts`` how many were started, ``history`` one line per failed attempt, ``device`` where
    the last ran, ``remote_traceback`` the worker's traceback text; ``__cause__`` is the worker's
    exception when it could be sent back."""

    code = "task_failed"
    exit_code = 1

    def __init__(self, message, attempts=0, history=(), device=None, index=None, remote_traceback=""):
        super().__init__(message)
        self.attempts = attempts
        self.history = list(history)
        self.device = device
        self.index = index
        self.remote_traceback = remote_traceback


class InternalError(GpuslotError, RuntimeError):
    """A bug in gpuslot."""


_BY_CODE = {
    "bad_input": BadInput,
    "nothing_fits": NoGpuAvailable,
    "nvml_unavailable": NvmlUnavailable,
    "nvml_error": NvmlUnavailable,
    "state": StateDirectoryError,
    "timeout": Timeout,
    "internal": InternalError,
}


def from_error(code, message, reasons=(), warnings=()):
    """The exception for a C++ Error (used by the binding)."""
    cls = _BY_CODE.get(code, InternalError)
    error = cls(message, reasons, warnings)
    if code == "nvml_error":
        error.code = code
    return error
