"""One llama.cpp build: the extension, the tools and llama-cpp-python all use ggq/lib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggq import native
from ggq.cli import main

LOCK = json.loads((Path(__file__).resolve().parent.parent / "native" / "llama_cpp.lock.json").read_text())
COMMIT = LOCK["llama_cpp_commit"][:7]


def test_extension_reports_pinned_commit_and_cpu_backend() -> None:
    mod = native.load()
    assert mod.LLAMA_CPP_COMMIT == COMMIT
    assert mod.ggml_commit() == COMMIT  # what the linked libggml itself says
    assert "CPU" in mod.backends()
    cpu = [d for d in mod.devices() if d["type"] == "cpu"]
    assert cpu and cpu[0]["backend"] == "CPU"
    assert Path(mod.llama_library_path()).resolve().parent == native.lib_dir().resolve()


@pytest.mark.parametrize("tool", native.TOOLS)
def test_tools_are_built_from_the_same_tree(tool: str) -> None:
    path = native.tool_path(tool)
    if tool == "llama-quantize":  # no --version; it prints its build when it starts
        args = [str(path), "/nonexistent/in.gguf", "/nonexistent/out.gguf", "Q4_0"]
    else:
        args = [str(path), "--version"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert f"commit {COMMIT}" in text or f"({COMMIT})" in text, text
    # the tool resolves libllama from ggq/lib, not from anywhere else on the system
    ldd = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    resolved = {
        Path(parts[0]).name: Path(parts[2]).resolve()
        for parts in (line.split() for line in ldd.splitlines())
        if len(parts) >= 3 and parts[1] == "=>"
    }
    assert resolved["libllama.so"] == native.lib_dir().resolve() / "libllama.so", ldd
    assert resolved["libggml-base.so"] == native.lib_dir().resolve() / "libggml-base.so", ldd


def test_unknown_tool_is_a_clear_error() -> None:
    with pytest.raises(native.NativeError, match=r"unknown llama\.cpp tool 'llama-server'"):
        native.tool_path("llama-server")


def test_llama_cpp_python_loads_the_same_library() -> None:
    """In a fresh process: llama_cpp and ggq._native map one and the same libllama file."""
    code = (
        "import json, ggq.native as n\n"
        "m = n.load(); lc = n.import_llama_cpp()\n"
        "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libllama.so' in l}\n"
        "print(json.dumps({'maps': sorted(maps), 'lib': lc.llama_cpp._lib._name,\n"
        "  'sys_lc': lc.llama_print_system_info().decode(), 'sys_ggq': m.system_info()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["maps"]) == 1, got["maps"]
    assert Path(got["maps"][0]).resolve() == Path(got["lib"]).resolve()
    assert Path(got["lib"]).resolve().parent == native.lib_dir().resolve()
    assert got["sys_lc"] == got["sys_ggq"]


def test_plain_import_llama_cpp_uses_ggq_build() -> None:
    """A user of the environment writes `import llama_cpp`, without ggq and without
    LLAMA_CPP_LIB_PATH: it must load, and map ggq's own libllama and libggml (no second build)."""
    import os

    code = (
        "import json, llama_cpp\n"
        "llama_cpp.llama_backend_init()\n"
        "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libggml' in l or 'libllama' in l}\n"
        "print(json.dumps({'maps': sorted(maps), 'info': llama_cpp.llama_print_system_info().decode()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    mapped = {Path(p).resolve() for p in got["maps"]}
    assert native.lib_dir().resolve() / "libllama.so" in mapped
    assert {p.parent for p in mapped} == {native.lib_dir().resolve()}, mapped
    assert got["info"] == native.load().system_info()


def test_info_json_reports_build_and_devices() -> None:
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["llama_cpp"]["commit_linked"] == COMMIT
    assert report["llama_cpp"]["commit_pinned"] == COMMIT
    assert "CPU" in report["llama_cpp"]["backends"]
    assert report["llama_cpp_python"]["same_build"] is True
    assert report["packages"]["torch"] and report["packages"]["transformers"] and report["packages"]["gguf"]
    for path in report["llama_cpp"]["tools"].values():
        assert Path(path).is_file()


def test_info_table_names_commit_and_backend() -> None:
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert f"commit {COMMIT}" in result.output
    assert "CPU" in result.output and "same build" in result.output
