"""The one llama.cpp build of this environment: the extension, its libraries and its tools.

Everything native that ggq uses (the extension ``ggq._native``, llama.cpp's tools, and
llama-cpp-python for chat) loads the same shared libraries from ``ggq/lib``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from ggq.errors import GGQError
from ggq.files import atomic_write

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-tokenize", "llama-bench")


class NativeError(GGQError, RuntimeError):
    """The native build is missing or incomplete."""


class DeviceError(GGQError, ValueError):
    """A device the linked llama.cpp build does not have (``--gpu-layers N`` without a GPU)."""


def load() -> ModuleType:
    """Import ``ggq._native`` with a message that says how to build it when it is absent."""
    try:
        return importlib.import_module("ggq._native")
    except ImportError as exc:
        raise NativeError(
            f"the native extension ggq._native is not built ({exc}); run `make install` "
            "(or `pip install -e .`) in the ggq repository"
        ) from exc


def package_dir() -> Path:
    """Directory holding the compiled files (the extension, lib/, bin/, data/)."""
    spec = importlib.util.find_spec("ggq._native")
    if spec is None or spec.origin is None:
        raise NativeError("ggq._native is not built: run `make install` in the ggq repository")
    return Path(spec.origin).parent


def lib_dir() -> Path:
    """Directory of libllama / libggml*: also the one llama-cpp-python is pointed at."""
    return package_dir() / "lib"


def tool_path(name: str) -> Path:
    """Path of a llama.cpp tool built with ggq, e.g. ``tool_path("llama-perplexity")``."""
    if name not in TOOLS:
        raise NativeError(f"unknown llama.cpp tool {name!r}; built tools: {', '.join(TOOLS)}")
    path = package_dir() / "bin" / name
    if not path.is_file():
        raise NativeError(f"{path} is missing: the native build is incomplete, run `make install`")
    return path


def data_path(*parts: str) -> Path:
    """A file installed from vendor/llama.cpp beside the extension (e.g. the Qwen2 vocabulary)."""
    path = package_dir().joinpath("data", *parts)
    if not path.exists():
        raise NativeError(f"{path} is missing: the native build is incomplete, run `make install`")
    return path


def bind_llama_cpp() -> Path:
    """Point the installed llama-cpp-python at ggq's build: its ``llama_cpp/lib`` (where a plain
    ``import llama_cpp`` looks for libllama and libggml) becomes a link to :func:`lib_dir`, so one
    build serves everything, with or without ``LLAMA_CPP_LIB_PATH``. Returns the link."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise NativeError("llama-cpp-python is not installed; `make install` installs it against ggq's build")
    link = Path(spec.origin).parent / "lib"
    target = lib_dir()
    if link.is_symlink() and link.resolve() == target.resolve():
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)  # a wheel's own copy of llama.cpp: two builds in one process is a bug
    with atomic_write(link, f".{os.getpid()}") as tmp:
        tmp.symlink_to(target, target_is_directory=True)
    return link


def import_llama_cpp() -> ModuleType:
    """Import llama-cpp-python bound to ggq's llama.cpp build rather than a copy of its own."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise NativeError(
            f"llama-cpp-python is not installed ({exc}); `make install` installs it against ggq's build"
        ) from exc


def gpu_devices() -> list[str]:
    """Descriptions of the GPUs the linked llama.cpp can use (none in a CPU build)."""
    return [d["description"] for d in load().devices() if d["type"] in ("gpu", "igpu")]


def check_gpu_layers(n_gpu_layers: int) -> None:
    if n_gpu_layers > 0 and not gpu_devices():
        raise DeviceError(
            f"--gpu-layers {n_gpu_layers}: no GPU available to this llama.cpp build "
            "(`ggq info` lists its back ends and devices; build with GGQ_CUDA=ON for CUDA)"
        )
