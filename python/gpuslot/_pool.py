"""gpuslot.WorkerPool: the Python face of the C++ worker pool (include/gpuslot/pool.hpp).

The C++ side does everything that decides: leases per worker, forking, dispatch, requeue on out
of memory or worker death, ordering. This file only pickles items and results, runs ``init`` and
``work`` in the forked workers (the ``_run_*`` helpers the binding calls there), and turns results
into return values, futures and exceptions.
"""

import atexit
import concurrent.futures
import pickle
import sys
import threading
import traceback
import weakref

from . import _gpuslot
from .errors import GpuslotError, TaskFailed, WorkerInitFailed, from_error

_MAX_MESSAGE = 2000


def _describe(exc):
    """One line for an exception: its type and message (what out-of-memory detection reads)."""
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ itself fails still has a type
        message = "(its message cannot be shown)"
    text = "%s: %s" % (type(exc).__name__, message) if message else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _failure(exc):
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = pickle.dumps((exc, detail), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that cannot be pickled still sends its text
        blob = pickle.dumps((None, detail), protocol=pickle.HIGHEST_PROTOCOL)
    return False, blob, _describe(exc)


# --- called by the binding in a worker process ---


def _run_init(init, device, info):
    try:
        if init is not None:
            init(device)
        return True, b"", ""
    except BaseException as exc:  # noqa: B036 — a worker answers whatever happened
        return _failure(exc)


def _run_task(work, payload):
    try:
        result = work(pickle.loads(payload))
        return True, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), ""
    except BaseException as exc:  # noqa: B036
        return _failure(exc)


def _before_fork():
    # Flush what Python has buffered, or the worker would print it a second time.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _before_exit():
    _before_fork()


# --- in the pool's process ---


def _remote_error(payload):
    try:
        exc, detail = pickle.loads(payload)
        return exc, detail
    except Exception:
        return None, ""


def _task_failed(message, attempts, history, device, payload, index=None):
    exc, detail = _remote_error(payload) if payload else (None, "")
    error = TaskFailed(message, attempts, history, device, index, detail)
    if isinstance(exc, BaseException):
        error.__cause__ = exc
    return error


def _result_of(payload, attempts, history, device, index=None):
    """A task's returned value, unpickled here; (True, value), or (False, TaskFailed) when the
    value cannot be rebuilt in this process (its class is unknown here, its __reduce__ fails)."""
    try:
        return True, pickle.loads(payload)
    except Exception as exc:
        error = TaskFailed("its result could not be unpickled in the pool's process: " + _describe(exc), attempts,
                           history, device, index, "")
        error.__cause__ = exc
        return False, error


def _complete(future, result):
    """Delivers one result to its future (called on the pool's dispatcher thread)."""
    status, payload, message, attempts, history, device = result
    if future.done():  # cancelled by its caller meanwhile
        return
    if status == "succeeded":
        ok, value = _result_of(payload, attempts, history, device)
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    elif status == "cancelled":
        future.cancel()
    else:
        future.set_exception(_task_failed(message, attempts, history, device, payload))


_OPEN_POOLS = weakref.WeakSet()


@atexit.register
def _close_open_pools():
    # The dispatcher thread must not call into an interpreter that is shutting down.
    for pool in list(_OPEN_POOLS):
        pool.close()


class WorkerPool:
    """One persistent worker process per GPU, fed from one shared queue.

    ``init(device)`` runs once in each worker, on its GPU (``device`` is ``"cuda:N"`` inside this
    process's CUDA_VISIBLE_DEVICES: call ``torch.cuda.set_device(device)`` and load the model);
    ``work(item)`` runs for each item, in the same worker, and returns its result. Items and
    results are pickled; ``init`` and ``work`` are not (workers are forked, so closures and
    lambdas are fine).

    Parameters:
        mem:      memory reserved on each worker's GPU before it starts, e.g. "4G" (a lease in the
                  host-wide ledger, the same as ``gpuslot run``); a bare number is MiB.
        gpus:     number of workers (one per GPU); None: one per visible GPU with the room.
        retries:  how often a task is requeued after its worker ran out of GPU memory (an
                  exception whose text matches "CUDA out of memory", "CUDA_ERROR_OUT_OF_MEMORY",
                  "cudaErrorMemoryAllocation" or "OutOfMemoryError") or died; the next attempt
                  goes to another GPU first. Any other exception fails the task at once.
        strategy: how GPUs are chosen: "most-free", "least-used", "least-busy" or "pack".
        wait:     when no worker can start for lack of room, wait for it (FIFO-fair with every
                  other waiter on the host); False raises NoGpuAvailable instead.
        timeout:  with wait, raise gpuslot.Timeout after this many seconds.

    Workers start with the first task and live until ``close()`` (or the end of a ``with``
    block, or of the program). They ignore SIGINT, die with this process, and never change its
    environment. The parent must not have initialised CUDA before the first task (a forked
    process cannot use its parent's CUDA context).
    """

    def __init__(self, init, work, mem="4G", gpus=None, retries=3, *, strategy="most-free", wait=True,
                 timeout=None):
        from . import _memory_bytes, _seconds, _non_negative_int

        from . import _strategy

        if init is not None and not callable(init):
            raise from_error("bad_input", "init must be callable or None, not %s" % type(init).__name__)
        if not callable(work):
            raise from_error("bad_input", "work must be callable, not %s" % type(work).__name__)
        workers = None if gpus is None else _non_negative_int(gpus, "gpus", minimum=1)
        self._closed = True
        self._core = _gpuslot.WorkerPoolCore(
            init, work, _memory_bytes(mem, "mem"), workers, _non_negative_int(retries, "retries"),
            _strategy(strategy), bool(wait), _seconds(timeout, "timeout"), "",
        )
        self._closed = False
        self._lock = threading.Lock()
        _OPEN_POOLS.add(self)

    # -- tasks --

    def submit(self, item):
        """Queues one item; returns a concurrent.futures.Future of its result (a TaskFailed
        exception when it fails for good). Cancelling the future drops the task if it has not
        started."""
        future = concurrent.futures.Future()
        blob = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        task_id = self._live().submit(blob, future, _complete)
        core = self._core

        def on_done(done):
            if done.cancelled():
                try:
                    core.cancel([task_id])
                except GpuslotError:
                    pass

        future.add_done_callback(on_done)
        return future

    def map(self, items, *, return_exceptions=False):
        """Runs ``work`` on every item; returns the results in the order of ``items``.

        A task that fails for good raises TaskFailed (for the first such item, once every item
        is done), or, with ``return_exceptions=True``, stands in the list as its TaskFailed.
        Raises the pool's own error (NoGpuAvailable, Timeout, WorkerInitFailed, …) if the pool
        cannot run at all. Ctrl-C cancels the items not yet started and raises KeyboardInterrupt.
        """
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        results = self._live().map(blobs)
        self._raise_pool_failure()
        values = []
        first_failure = None
        for index, (status, payload, message, attempts, history, device) in enumerate(results):
            if status == "succeeded":
                ok, value = _result_of(payload, attempts, history, device, index)
                if ok:
                    values.append(value)
                    continue
                error = value
            elif status == "cancelled":
                error = concurrent.futures.CancelledError(message)
            else:
                error = _task_failed(message, attempts, history, device, payload, index)
            if first_failure is None:
                first_failure = error
            values.append(error)
        if first_failure is not None and not return_exceptions:
            raise first_failure
        return values

    def workers(self):
        """The workers now: dicts with worker, device ("cuda:N"), cuda_ordinal, nvml_index, uuid,
        pid, state ("starting", "idle", "busy"), tasks_done and lease_id."""
        return self._live().workers()

    def close(self, grace=2.0):
        """Stops the pool: queued tasks are cancelled, each worker may finish its running task
        for ``grace`` seconds, then is killed; the leases are released. Idempotent."""
        from . import _seconds

        grace = _seconds(grace, "grace")  # checked before anything is closed
        if getattr(self, "_closed", True):
            return
        self._closed = True
        _OPEN_POOLS.discard(self)
        self._core.close(2.0 if grace is None else grace)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._closed else "%d workers" % len(self._core.workers())
        return "<gpuslot.WorkerPool %s>" % state

    # -- internals --

    def _live(self):
        if self._closed:
            # A usage error, like I/O on a closed file (BadInput is a ValueError).
            raise from_error("bad_input", "the worker pool is closed; make a new one to run more tasks")
        return self._core

    def _raise_pool_failure(self):
        failure = self._core.failure()
        if failure is None:
            return
        code, message, in_init = failure
        if in_init:
            raise WorkerInitFailed(message)
        raise from_error(code, message)
