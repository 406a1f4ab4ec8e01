"""`ggq info`: what is installed, which llama.cpp build is linked, and which devices it sees."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

from ggq import __version__, native

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "llama_cpp_python")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_features(system_info: str) -> list[str]:
    """Features flagged ``= 1`` in llama_print_system_info(), e.g. ``AVX2``, ``F16C``."""
    return sorted({m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1\b", system_info)})


def _torch_devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def torch_report() -> dict[str, Any]:
    """The torch build (CUDA or not: ``GGQ_CUDA=ON make`` installs PyPI's CUDA wheel) and where
    each part of the solvers runs with ``--device auto``."""
    try:
        import torch
    except ImportError:
        return {"installed": False}
    from ggq.solvers.options import resolve_device, solver_devices

    return {
        "installed": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,  # None: built without CUDA
        "cuda_available": torch.cuda.is_available(),
        "solver_devices": solver_devices(resolve_device("auto")),
    }


def _llama_cpp_python(lib_dir: Path) -> dict[str, Any]:
    """Which libllama llama-cpp-python loads when imported through ggq."""
    version = _version("llama_cpp_python")
    if version is None:
        return {"installed": False}
    mod = native.import_llama_cpp()
    lib_path = Path(mod.llama_cpp._lib._name).resolve()
    return {
        "installed": True,
        "version": version,
        "library": str(lib_path),
        "same_build": lib_path.parent == lib_dir.resolve(),
        "system_info": mod.llama_print_system_info().decode(),
    }


def collect() -> dict[str, Any]:
    """Everything `ggq info` prints, as plain data (the --json output)."""
    report: dict[str, Any] = {
        "ggq": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda_devices": _torch_devices(),
        "torch": torch_report(),
    }
    try:
        mod = native.load()
        lib_dir = native.lib_dir()
    except native.NativeError as exc:
        report["native_error"] = str(exc)
        return report
    system_info = mod.system_info()
    report["llama_cpp"] = {
        "commit_pinned": mod.LLAMA_CPP_COMMIT,
        "commit_linked": mod.ggml_commit(),
        "ggml_version": mod.ggml_version(),
        "source": mod.LLAMA_CPP_SDIST,
        "library": mod.llama_library_path(),
        "lib_dir": str(lib_dir),
        "tools": {t: str(native.tool_path(t)) for t in native.TOOLS},
        "backends": mod.backends(),
        "gpu_offload": mod.supports_gpu_offload(),
        "devices": mod.devices(),
        "cpu_features": cpu_features(system_info),
        "system_info": system_info,
    }
    report["llama_cpp_python"] = _llama_cpp_python(lib_dir)
    report["threads"] = os.cpu_count()
    return report


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ggq.solvers.options import devices_line

    console = Console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("ggq", report["ggq"])
    table.add_row("python", f"{report['python']} ({report['platform']})")
    for name, ver in report["packages"].items():
        table.add_row(name, ver or "[red]not installed[/red]")
    if "native_error" in report:
        table.add_row("native", f"[red]{report['native_error']}[/red]")
        console.print(table)
        return
    lc = report["llama_cpp"]
    table.add_row(
        "llama.cpp", f"commit {lc['commit_linked']} (pinned {lc['commit_pinned']}, from {lc['source']})"
    )
    table.add_row("back ends", ", ".join(lc["backends"]))
    for dev in lc["devices"]:
        mem = f", {dev['memory_total'] / 2**30:.1f} GiB" if dev["memory_total"] else ""
        table.add_row(f"device {dev['name']}", f"{dev['type']}: {dev['description']}{mem}")
    table.add_row("cpu features", " ".join(lc["cpu_features"]))
    table.add_row("torch cuda", ", ".join(report["torch_cuda_devices"]) or "none")
    tr = report["torch"]
    if tr["installed"]:
        build = (
            f"CUDA {tr['cuda_build']} build" if tr["cuda_build"] else "[yellow]built without CUDA[/yellow]"
        )
        seen = "sees a CUDA device" if tr["cuda_available"] else "sees no CUDA device"
        table.add_row("torch build", f"{tr['version']}: {build}, {seen}")
        table.add_row(
            "solvers (--device auto)", devices_line(tr["solver_devices"]).removeprefix("solver devices: ")
        )
    table.add_row("libllama", lc["library"])
    table.add_row("tools", str(Path(lc["tools"]["llama-perplexity"]).parent))
    lcp = report["llama_cpp_python"]
    if lcp["installed"]:
        same = "[green]same build[/green]" if lcp["same_build"] else "[red]a different build[/red]"
        table.add_row("llama-cpp-python", f"{lcp['version']}: {lcp['library']} ({same})")
    console.print(table)
