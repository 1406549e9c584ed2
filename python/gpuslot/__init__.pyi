# Type hints for the gpuslot package (the implementation is gpuslot/__init__.py, gpuslot/_pool.py
# and the C++ module gpuslot._gpuslot).
import concurrent.futures
from types import TracebackType
from typing import Any, Callable, Dict, Generic, Iterable, List, Optional, Sequence, Type, TypeVar, Union, overload

from .errors import (
    BadInput as BadInput,
    GpuslotError as GpuslotError,
    InternalError as InternalError,
    NoGpuAvailable as NoGpuAvailable,
    NvmlUnavailable as NvmlUnavailable,
    StateDirectoryError as StateDirectoryError,
    TaskFailed as TaskFailed,
    Timeout as Timeout,
    WorkerInitFailed as WorkerInitFailed,
)

__version__: str

Size = Union[str, int, float]  # "8G", "512M", "8GiB"; a bare number is MiB
Seconds = Union[int, float, str]  # seconds, or a duration such as "10m"

def select_best_gpu(
    min_free_memory_gb: float = 8.0,
    exclude_gpus: Optional[Union[int, str, Iterable[Union[int, str]]]] = None,
    strategy: str = "most-free",
) -> int: ...
def resolve_device(
    spec: Optional[str] = None,
    env: str = "GPUSLOT_DEVICE",
    min_free_memory_gb: Optional[float] = None,
    strategy: str = "most-free",
) -> str: ...

class Lease:
    @property
    def id(self) -> str: ...
    @property
    def cuda_ordinals(self) -> List[int]: ...
    @property
    def devices(self) -> List[str]: ...
    @property
    def uuids(self) -> List[str]: ...
    @property
    def nvml_indices(self) -> List[int]: ...
    @property
    def reserved_bytes(self) -> int: ...
    @property
    def held(self) -> bool: ...
    def release(self) -> None: ...
    def hold_until_exit(self) -> None: ...
    def __enter__(self) -> "Lease": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> bool: ...

def lease(
    mem: Size = "8G",
    gpus: int = 1,
    wait: bool = True,
    timeout: Optional[Seconds] = None,
    *,
    strategy: str = "most-free",
    device: Optional[str] = None,
    max_utilization: Optional[int] = None,
) -> Lease: ...
def status() -> Dict[str, Any]: ...
def release_held_leases() -> int: ...
def parse_size(text: Size) -> int: ...

Item = TypeVar("Item")
Result = TypeVar("Result")

class WorkerPool(Generic[Item, Result]):
    def __init__(
        self,
        init: Optional[Callable[[str], Any]],
        work: Callable[[Item], Result],
        mem: Size = "4G",
        gpus: Optional[int] = None,
        retries: int = 3,
        *,
        strategy: str = "most-free",
        wait: bool = True,
        timeout: Optional[Seconds] = None,
    ) -> None: ...
    def submit(self, item: Item) -> "concurrent.futures.Future[Result]": ...
    @overload
    def map(self, items: Iterable[Item]) -> List[Result]: ...
    @overload
    def map(self, items: Iterable[Item], *, return_exceptions: bool) -> List[Union[Result, BaseException]]: ...
    def workers(self) -> List[Dict[str, Any]]: ...
    def close(self, grace: float = 2.0) -> None: ...
    def __enter__(self) -> "WorkerPool[Item, Result]": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> bool: ...
