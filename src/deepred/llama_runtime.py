"""llama-cpp-python at run time: the one place the project opens a GGUF with llama.cpp (the parity check and the
server both do), the threads it uses, and child processes that die with their parent.

The weight-repacking workaround: llama-cpp-python built with native CPU flags on a Xeon with AMX segfaults in
llama_decode for q8_0 and k-quant models (NOTES.md); every model is created with repacking off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from .errors import DeepRedError

_params_lock = threading.RLock()


def llama_cpp_version() -> str:
    """llama-cpp-python's version: part of every cache key of answers llama.cpp generated (an upgrade can change
    them)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def weight_repacking_disabled() -> Iterator[None]:
    """While active, every llama-cpp-python model is created with `use_extra_bufts = False`.

    Why: llama-cpp-python built with native CPU flags on a Xeon with AMX segfaults in llama_decode for q8_0 and
    k-quant models (NOTES.md): llama.cpp repacks those weights into an "extra" CPU buffer type (AMX tiles) at load
    time and that path crashes. `use_extra_bufts` is a llama_model_params field that `Llama()` does not expose; it
    fills the struct from `llama_cpp.llama_cpp.llama_model_default_params()` and loads the weights in the same
    __init__, so setting the field afterwards is too late. We swap that module function for one that turns the
    field off, for the duration of the block. Cost: no SIMD weight repacking on CPU (slower prompt processing for
    quantised models on CPU; GPU offload is unaffected).
    """
    import llama_cpp.llama_cpp as low_level

    with _params_lock:
        original = low_level.llama_model_default_params

        def params_without_repacking():
            params = original()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = params_without_repacking
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


def assert_no_repacking(llm) -> None:
    """Fail loudly if a llama-cpp-python upgrade stopped honouring the patch above."""
    params = llm.model_params
    if "use_extra_bufts" not in dict(type(params)._fields_) or params.use_extra_bufts:
        raise RuntimeError("llama-cpp-python ignored use_extra_bufts=False (its Llama() changed); update "
                           "deepred.llama_runtime.weight_repacking_disabled or quantised models may crash on AMX CPUs")


def cpu_threads() -> int:
    """One llama.cpp thread per core this process may use (hyperthread siblings share a core's arithmetic).

    llama-cpp-python's default is half the logical CPUs, which assumes two threads per core: on a 2-core machine
    without SMT that is one thread, and generation measured 1.5x slower than with two.
    """
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        smt = Path("/sys/devices/system/cpu/smt/active").read_text().strip() == "1"
    except OSError:
        smt = False
    return max(1, logical // 2 if smt else logical)


def load_llama(path: str | os.PathLike, **kwargs: Any):
    """`llama_cpp.Llama(path, **kwargs)` with weight repacking off (AMX crash workaround). Call `.close()` after."""
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise DeepRedError(f"GGUF file not found: {path}")
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_threads", cpu_threads())
    kwargs.setdefault("n_threads_batch", cpu_threads())
    try:
        with weight_repacking_disabled():
            llm = Llama(str(path), **kwargs)
    except ValueError as exc:
        raise DeepRedError(f"llama.cpp cannot load {path} ({exc}); the file is damaged or not a GGUF model: "
                           "convert it again with `deepred convert`") from exc
    try:
        assert_no_repacking(llm)
    except RuntimeError:
        llm.close()
        raise
    return llm


def die_with_parent() -> None:
    """In a child process: get SIGKILL when the parent dies, so a killed `convert` or pipeline takes its converter or
    server with it (Linux; elsewhere a no-op). Note: it fires when the thread that started the child exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
