"""gpuslot — pick, reserve and schedule NVIDIA GPUs on a shared Linux server.

The same semantics as the ``gpuslot`` command, from Python, with no race between processes:
a GPU is chosen and its memory reserved in one step under a host-wide lock, and the reservation
(a *lease*) lives exactly as long as the process holding it — the kernel drops it when the
process dies, however it dies.

    import gpuslot, torch

    # A service resolving its ``ASR_DEVICE=auto|cuda|cuda:N|cpu`` setting before loading its model:
    device = gpuslot.resolve_device(env="ASR_DEVICE", min_free_memory_gb=8)    # "cuda:1" or "cpu"

    # The seed's select_best_gpu: a CUDA ordinal, its memory reserved for this process's life.
    index = gpuslot.select_best_gpu(min_free_memory_gb=8.0)
    model.to(torch.device(f"cuda:{index}"))

    # A lease for a block of code:
    with gpuslot.lease(mem="8G", gpus=2, timeout=600) as held:
        run_on(held.cuda_ordinals)

    # One persistent worker per GPU, fed from one queue:
    with gpuslot.WorkerPool(load_model, transcribe, mem="6G") as pool:
        texts = pool.map(chunks)

Where the GPUs and leases are: NVML is loaded from GPUSLOT_NVML_LIBRARY, else
libnvidia-ml.so.1; leases live in GPUSLOT_STATE_DIR, else /run/gpuslot (when an administrator
made it), else /tmp/gpuslot. CUDA ordinals are always inside this process's
CUDA_VISIBLE_DEVICES; gpuslot never changes this process's environment.

Errors are the exceptions in gpuslot.errors (BadInput is a ValueError, NoGpuAvailable has the
per-GPU ``reasons``, NvmlUnavailable, Timeout, StateDirectoryError, TaskFailed, …). Log lines go
to the ``gpuslot`` logger.
"""

import collections.abc
import json
import logging
import numbers

from . import _gpuslot
from ._pool import WorkerPool
from .errors import (
    BadInput,
    GpuslotError,
    InternalError,
    NoGpuAvailable,
    NvmlUnavailable,
    StateDirectoryError,
    TaskFailed,
    Timeout,
    WorkerInitFailed,
    from_error,
)

__version__ = _gpuslot.version()

__all__ = [
    "select_best_gpu",
    "resolve_device",
    "lease",
    "Lease",
    "status",
    "release_held_leases",
    "parse_size",
    "WorkerPool",
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

log = logging.getLogger("gpuslot")

Lease = _gpuslot.Lease

_GIB = 1024 ** 3


# --- argument checking: one line per mistake, as BadInput ---


def _bad(message):
    return from_error("bad_input", message)


def _gib_to_bytes(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad("invalid %s %r: expected a number of GiB, such as 8 or 0.5" % (name, value))
    if not 0 <= value <= 1024 * 1024:  # also NaN; compared before float(), which overflows on huge ints
        raise _bad("invalid %s %r: expected a number of GiB from 0 to 1048576" % (name, value))
    return int(round(float(value) * _GIB))


def _memory_bytes(value, name):
    """A size as the command line takes it ('8G', '512M', a bare number = MiB)."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise _bad("invalid %s %r: expected a size such as '8G' or '512M'" % (name, value))
    text = value if isinstance(value, str) else repr(value)
    try:
        return _gpuslot.parse_size(text)
    except BadInput as error:
        raise _bad("%s: %s" % (name, error)) from None


def _seconds(value, name):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return _gpuslot.parse_duration(value)
        except BadInput as error:
            raise _bad("%s: %s" % (name, error)) from None
    # Compared before float(), which overflows on huge ints; NaN and inf fail the comparison.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1e9:
        raise _bad("invalid %s %r: expected seconds (0 to 1e9) or a duration such as '10m'" % (name, value))
    return float(value)


def _non_negative_int(value, name, minimum=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or value > 1024:
        raise _bad("invalid %s %r: expected a whole number from %d to 1024" % (name, value, minimum))
    return int(value)


def _strategy(value):
    if not isinstance(value, str):
        raise _bad("invalid strategy %r: expected most-free, least-used, least-busy or pack" % (value,))
    return value


def _log_explanation(answer, level=logging.DEBUG):
    for line in answer.get("lines", ()):
        log.log(level, "%s", line)
    for line in answer.get("warnings", ()):
        log.warning("%s", line)


# --- the API ---


def select_best_gpu(min_free_memory_gb=8.0, exclude_gpus=None, strategy="most-free"):
    """The CUDA ordinal of the best GPU with ``min_free_memory_gb`` GiB available, reserved.

    Returns the ordinal to pass to ``torch.device(f"cuda:{i}")`` or ``device_index=``: a position
    inside this process's CUDA_VISIBLE_DEVICES. The memory is reserved (a lease) for the life of
    this process, so a process started a second later sees it taken and goes elsewhere; it stops
    counting once the process's own memory on that GPU shows it, and is released when the
    process exits (``release_held_leases()`` releases it earlier).

    exclude_gpus: CUDA ordinals (ints, the numbering returned here) or GPU UUIDs never to pick.
    strategy: "most-free" (default), "least-used", "least-busy" or "pack".

    Raises NoGpuAvailable (``reasons``: one line per GPU) when no GPU has the room now,
    NvmlUnavailable without an NVIDIA driver, BadInput for a bad argument.
    """
    memory = _gib_to_bytes(min_free_memory_gb, "min_free_memory_gb")
    if exclude_gpus is None:
        exclude = []
    else:
        if isinstance(exclude_gpus, (numbers.Integral, str)) and not isinstance(exclude_gpus, bool):
            exclude_gpus = [exclude_gpus]
        elif not isinstance(exclude_gpus, collections.abc.Iterable):
            raise _bad("invalid exclude_gpus %r: expected CUDA ordinals (0, 1, …) or GPU UUIDs" % (exclude_gpus,))
        exclude = []
        for entry in exclude_gpus:
            if isinstance(entry, bool) or not isinstance(entry, (numbers.Integral, str)) or (
                isinstance(entry, numbers.Integral) and entry < 0
            ):
                raise _bad("invalid entry %r in exclude_gpus: expected CUDA ordinals (0, 1, …) or GPU UUIDs" % (entry,))
            exclude.append(str(entry))
    answer = _gpuslot.select_best_gpu(memory, exclude, _strategy(strategy), "")
    _log_explanation(answer)
    log.info("select_best_gpu: cuda:%d = %s%s", answer["cuda_ordinal"], answer["summary"],
             ", lease " + answer["lease_id"] if answer["lease_id"] else "")
    return answer["cuda_ordinal"]


def resolve_device(spec=None, env="GPUSLOT_DEVICE", min_free_memory_gb=None, strategy="most-free"):
    """A service's device setting resolved to ``"cuda:N"`` or ``"cpu"``, as ``gpuslot device``.

    spec: "auto", "cuda", "cuda:N", "cpu" or "GPU-<uuid>"; None reads the variable ``env``
    (default GPUSLOT_DEVICE), and "auto" when that is unset.
      auto    a GPU when the driver is there and one is visible, else "cpu"; GPUs present but
              none with the room raises NoGpuAvailable (never a silent cpu)
      cuda    a GPU is required (NvmlUnavailable without one)
      cuda:N  that ordinal, which must exist (BadInput) and have the room
      cpu     "cpu", without touching the GPUs
    min_free_memory_gb: GiB the service needs; a GPU result then also reserves it for the life
    of this process, so services started together spread over the GPUs.

    The per-GPU lines ``gpuslot device`` prints go to the ``gpuslot`` logger (INFO).
    """
    if spec is not None and not isinstance(spec, str):
        raise _bad("invalid device %r: expected auto, cuda, cuda:N, cpu or GPU-<uuid>" % (spec,))
    if not isinstance(env, str):
        raise _bad("invalid env %r: expected the name of an environment variable" % (env,))
    memory = 0 if min_free_memory_gb is None else _gib_to_bytes(min_free_memory_gb, "min_free_memory_gb")
    try:
        answer = _gpuslot.resolve_device(spec, env, memory, _strategy(strategy), "")
    except GpuslotError as error:
        _log_lines(getattr(error, "log", ()))
        raise
    _log_lines(answer["log"])
    return answer["device"]


def _log_lines(lines):
    for warning, line in lines:
        log.log(logging.WARNING if warning else logging.INFO, "%s", line)


def lease(mem="8G", gpus=1, wait=True, timeout=None, *, strategy="most-free", device=None, max_utilization=None):
    """Reserves ``mem`` on each of ``gpus`` GPUs; returns a Lease, also a context manager.

        with gpuslot.lease(mem="8G") as held:
            held.cuda_ordinals   # [1]  (inside this process's CUDA_VISIBLE_DEVICES)
            held.uuids           # ["GPU-…"]
            held.nvml_indices    # [1]  (nvidia-smi's numbering)

    The lease is released at the end of the ``with`` block, by ``release()``, when the object
    is garbage-collected, or when the process dies. wait: wait for room, FIFO-fair with every
    other waiter on the host (Ctrl-C interrupts); False raises NoGpuAvailable at once. timeout:
    seconds (or "10m") before gpuslot.Timeout. device: only this device ("cuda:1", "GPU-…").
    """
    memory = _memory_bytes(mem, "mem")
    count = _non_negative_int(gpus, "gpus", minimum=1)
    if device is not None and not isinstance(device, str):
        raise _bad("invalid device %r: expected cuda:N, GPU-<uuid>, cuda or auto" % (device,))
    if max_utilization is not None:
        max_utilization = _non_negative_int(max_utilization, "max_utilization")
        if max_utilization > 100:
            raise _bad("invalid max_utilization %d: expected a percent, 0 to 100" % max_utilization)

    def pending(reason):
        log.info("waiting: %s", reason)

    explanation = {}
    held = _gpuslot.acquire_lease(memory, count, _strategy(strategy), device or "", bool(wait),
                                  _seconds(timeout, "timeout"), max_utilization, "", pending, explanation)
    _log_explanation(explanation)
    return held


def _lease_enter(self):
    return self


def _lease_exit(self, *exc_info):
    self.release()
    return False


def _lease_repr(self):
    if not self.held:
        return "<gpuslot.Lease released>"
    return "<gpuslot.Lease %s: %s on cuda:%s (GPU %s)>" % (
        self.id, _format_bytes(self.reserved_bytes), ",".join(map(str, self.cuda_ordinals)) or "?",
        ",".join(map(str, self.nvml_indices)))


def _lease_devices(self):
    return ["cuda:%d" % ordinal for ordinal in self.cuda_ordinals]


def _format_bytes(count):
    return "%.2f GiB" % (count / _GIB)


Lease.__enter__ = _lease_enter
Lease.__exit__ = _lease_exit
Lease.__repr__ = _lease_repr
Lease.devices = property(_lease_devices, doc='["cuda:N", …]: the GPUs as torch device strings')
Lease.__doc__ = lease.__doc__


def status():
    """Every GPU, its processes and leases, and the recommended GPU: the very document
    ``gpuslot status --json`` prints, as plain dicts and lists."""
    text, warnings = _gpuslot.status_json()
    for line in warnings:
        log.warning("%s", line)
    return json.loads(text)


def release_held_leases():
    """Releases the leases select_best_gpu and resolve_device keep for this process's life;
    returns how many there were."""
    return _gpuslot.release_held_leases()


def parse_size(text):
    """Bytes in a size as gpuslot reads it: '512M', '8G', '8GiB', '8GB' (GiB), '0.5G', '1T';
    a bare number is MiB."""
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise _bad("invalid size %r: expected a size such as '8G' or '512M'" % (text,))
    return _gpuslot.parse_size(text if isinstance(text, str) else repr(text))
