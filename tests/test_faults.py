"""Faults a hostile user or a bad day brings: signals in the middle of a long run, a disk that
fills, a folder that refuses files, two processes writing one output, GGUF files damaged where a
header check does not look. Each ends with one line naming the culprit, a non-zero status,
nothing under the final name and no temporary file left where the process could clean up."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from gguf import GGUFReader  # gguf-py: an independent parser, to find the bytes to damage

from ggq.cli import main
from ggq.gguf import read_gguf
from ggq.gguf import writer as writer_mod
from ggq.signals import GRACE_S

GGQ = [sys.executable, "-m", "ggq.cli"]
# what a non-interactive shell does to a job it starts with `&`: SIGINT ignored, then exec
SIGINT_IGNORED = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def _cli(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"ggq exited ({proc.returncode}) before the awaited state: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"not reached in {timeout} s: {proc.communicate()}")
        time.sleep(0.05)


def _gptq(model: Path, out: Path, *extra: str) -> list[str]:
    """A GPTQ run that spends many seconds in the solver on the embedded model."""
    args = ["convert", str(model), "--method", "gptq", "--type", "Q4_0", "--nsamples", "4", "--seqlen", "32"]
    return [*GGQ, *args, "-o", str(out), *extra]


def _finish(proc: subprocess.Popen[str], sent: float, what: str, timeout: float = 15) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{what}: still running {timeout} s after the signal")
    return stderr


# -- signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_in_the_solver_stops_cleans_up_and_says_so(
    qwen3_micro: Path, tmp_path: Path, sig: int, status: int, word: str
) -> None:
    """The bug: Ctrl-C to a background `ggq convert` (SIGINT ignored by the shell) was ignored and
    the file written with exit 0; SIGTERM killed it with its .part left behind."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = _gptq(qwen3_micro, out / "m.gguf", "--save-imatrix", str(out / "imatrix.gguf"))
    env = {**os.environ, "COLUMNS": "400"}  # rich wraps the layer lines at 80 columns off a terminal
    proc = subprocess.Popen([*SIGINT_IGNORED, *cmd], stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: any(out.glob(".m.gguf.*.part")), proc, 90)
    time.sleep(1.0)  # in layer 0's calibration forward passes and Hessians
    proc.send_signal(sig)
    sent = time.monotonic()
    stderr = _finish(proc, sent, signal.Signals(sig).name)
    took = time.monotonic() - sent
    assert proc.returncode == status, stderr
    assert took < 5, f"{took:.1f} s from the signal to the exit"
    progress = ("layer ", "solver devices:")  # what the run printed before the signal
    assert [line for line in _lines(stderr) if not line.startswith(progress)] == [word]
    assert sorted(p.name for p in out.iterdir()) == []  # no output, no .part, no .lock, no imatrix


HARNESS = """
import ctypes, sys
from pathlib import Path
from ggq.cli import main
from ggq.files import TEMPORARIES

@main.command("native-wait")
def native_wait() -> None:
    part = Path(sys.argv[1])
    part.write_bytes(b"partial")
    TEMPORARIES.add(part)
    print("ready", flush=True)
    # one native call: Python's handler cannot run until it returns (the sleep keeps no pipe open)
    ctypes.CDLL(None).system(b"exec sleep 6 </dev/null >/dev/null 2>&1")
    print("returned", flush=True)

main(["native-wait"])
"""


def test_signal_during_a_long_native_call_exits_within_the_grace_time(tmp_path: Path) -> None:
    """A llama.cpp decode or quantization holds the main thread in C for many seconds; the
    watchdog, woken by the signal itself, removes the temporary files and exits after GRACE_S."""
    part = tmp_path / ".x.gguf.abc.part"
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(part)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    time.sleep(0.3)  # inside system()
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=20)
    took = time.monotonic() - sent
    assert proc.returncode == 143, stderr
    assert GRACE_S - 0.5 < took < GRACE_S + 2, f"{took:.1f} s (grace {GRACE_S} s, the call lasts 6 s)"
    assert "returned" not in stdout  # the watchdog, not the end of the call, ended it
    assert _lines(stderr) == ["terminated"]
    assert not part.exists()


# -- faults while writing ------------------------------------------------------------------------


def test_output_folder_missing_fails_before_work(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    result = _cli(["convert", str(checkpoint("tied")), "--type", "Q8_0", "-o", str(missing / "m.gguf")])
    assert result.exit_code == 2, result.output
    assert _lines(result.stderr) == [f"Error: {missing / 'm.gguf'}: folder {missing} does not exist"]
    assert not (tmp_path / "no").exists()


def test_output_under_a_regular_file_fails(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """ENOTDIR, not EACCES: an error tests can provoke as root, where permission bits stop nothing."""
    plain = tmp_path / "notes.txt"
    plain.write_text("a file, not a folder")
    result = _cli(["convert", str(checkpoint("tied")), "--type", "Q8_0", "-o", str(plain / "m.gguf")])
    assert result.exit_code == 2, result.output
    assert _lines(result.stderr) == [f"Error: {plain / 'm.gguf'}: {plain} is not a folder"]
    assert plain.read_text() == "a file, not a folder"


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _without_dac_override() -> None:
    """In the child, before exec: root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, for whom
    permission bits count as for anyone (dropped from the bounding set, they are gone after exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unwritable_imatrix_folder_fails_before_the_solver(
    qwen3_micro: Path, tmp_path: Path, read_only_folder: Path
) -> None:
    """--save-imatrix is written after the solver; its folder is checked before. As root chmod
    stops nothing, so the command runs without the capability that overrides permission bits."""
    out, imatrix = tmp_path / "m.gguf", read_only_folder / "imatrix.gguf"
    argv = [
        *GGQ,
        "convert",
        str(qwen3_micro),
        "--method",
        "gptq",
        "-o",
        str(out),
        "--save-imatrix",
        str(imatrix),
    ]
    preexec = _without_dac_override if os.geteuid() == 0 else None
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, preexec_fn=preexec)
    assert done.returncode == 2, done.stderr
    assert _lines(done.stderr) == [
        f"Error: {imatrix}: cannot create files in {read_only_folder} (Permission denied)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read-only"]
    assert list(read_only_folder.iterdir()) == []


def test_disk_full_mid_write_names_the_file_and_leaves_nothing(
    checkpoint: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .part file is created for real, but its descriptor points at /dev/full: every write the
    kernel sees fails with ENOSPC, as on a full disk."""
    real_mkstemp = tempfile.mkstemp
    full = os.open("/dev/full", os.O_WRONLY)
    parts: list[Path] = []

    def mkstemp(
        suffix: str | None = None, prefix: str | None = None, dir: str | None = None
    ) -> tuple[int, str]:
        fd, name = real_mkstemp(suffix=suffix, prefix=prefix, dir=dir)
        if suffix == ".part":
            os.dup2(full, fd)
            parts.append(Path(name))
        return fd, name

    monkeypatch.setattr(writer_mod.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "m.gguf"
    try:
        result = _cli(["convert", str(checkpoint("tied")), "--type", "Q8_0", "-o", str(out)])
    finally:
        os.close(full)
    assert parts, "the writer made no .part file"
    assert result.exit_code == 2, result.output
    assert _lines(result.stderr) == [
        f"Error: {out}: cannot write (No space left on device, ENOSPC); nothing written under that name"
    ]
    assert list(tmp_path.iterdir()) == []


# -- two writers -----------------------------------------------------------------------------------


def test_second_writer_of_one_output_fails_naming_the_first(qwen3_micro: Path, tmp_path: Path) -> None:
    """While one process writes m.gguf, a second fails at once naming the first's pid. The lock dies
    with its holder: after a SIGKILL (no cleanup possible) the next run writes a complete file."""
    out = tmp_path / "m.gguf"
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # leave the second a core
    first = subprocess.Popen(
        _gptq(qwen3_micro, out, "-t", "1"), stderr=subprocess.PIPE, text=True, env=one_thread
    )
    _wait_for(lambda: any(tmp_path.glob(".m.gguf.*.part")), first, 90)
    rtn = [*GGQ, "convert", str(qwen3_micro), "--type", "Q8_0", "-o", str(out)]
    second = subprocess.run(rtn, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first writer ended before the second tried"
    assert second.returncode == 2, second.stderr
    assert _lines(second.stderr) == [f"Error: {out}: is being written by another process (pid {first.pid})"]
    assert not out.exists()
    first.kill()
    first.communicate()
    third = _cli(["convert", str(qwen3_micro), "--type", "Q8_0", "-o", str(out)])
    assert third.exit_code == 0, third.output
    theirs = GGUFReader(out)  # gguf-py, an independent parser, reads one complete file
    assert len(theirs.tensors) == 90 and int(theirs.fields["general.file_type"].parts[-1][0]) == 7  # Q8_0
    assert theirs.tensors[-1].data_offset + theirs.tensors[-1].n_bytes == out.stat().st_size
    assert not (tmp_path / ".m.gguf.lock").exists()


# -- damaged GGUF files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_gguf(checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("valid") / "tied-Q8_0.gguf"
    result = _cli(["convert", str(checkpoint("tied")), "--type", "Q8_0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _pos(reader: GGUFReader, part: object) -> int:
    """Byte offset in the file of one of gguf-py's field parts (a view into its memory map)."""
    return int(part.ctypes.data - reader.data.ctypes.data)  # type: ignore[attr-defined]


def _u64(data: bytearray, at: int, value: int) -> None:
    data[at : at + 8] = struct.pack("<Q", value)


def _damage(kind: str, src: Path) -> bytes:
    r = GGUFReader(src)
    data = bytearray(src.read_bytes())
    last, prev = r.tensors[-1], r.tensors[-2]
    # tensor info parts: name length, name, n_dims, dims, type, offset
    if kind == "offset beyond the end":
        _u64(data, _pos(r, last.field.parts[5]), 1 << 40)
    elif kind == "unknown type id":
        data[_pos(r, last.field.parts[4]) : _pos(r, last.field.parts[4]) + 4] = struct.pack("<I", 99)
    elif kind == "size beyond the file":
        dims = _pos(r, last.field.parts[3])
        _u64(data, dims + 8 * (len(last.shape) - 1), 4096)  # the outermost dimension, 4096 rows
    elif kind == "overlapping tensors":
        _u64(data, _pos(r, last.field.parts[5]), int(prev.data_offset - r.data_offset))
    elif kind == "string length 2^60":
        _u64(data, _pos(r, r.fields["general.architecture"].parts[3]), 1 << 60)
    elif kind == "truncated key/values":
        return bytes(data[: _pos(r, r.fields["tokenizer.ggml.merges"].parts[-1]) - 3])
    elif kind == "element count overflow":  # 2^35 x 2^35: numpy's int64 product wraps to 0 bytes
        dims = _pos(r, prev.field.parts[3])
        _u64(data, dims, 1 << 35)
        _u64(data, dims + 8, 1 << 35)
    elif kind == "n_tensors huge":
        _u64(data, 8, 1 << 62)
    elif kind == "alignment 0":  # general.file_type (uint32, as long a name) renamed, its value 0
        field = r.fields["general.file_type"]
        key, value = _pos(r, field.parts[1]), _pos(r, field.parts[-1])
        data[key : key + 17] = b"general.alignment"
        data[value : value + 4] = struct.pack("<I", 0)
    elif kind == "duplicate tensor name":  # a tensor renamed as an earlier one of as long a name
        twin, dup = next(
            (a, b) for i, a in enumerate(r.tensors) for b in r.tensors[i + 1 :] if len(a.name) == len(b.name)
        )
        at = _pos(r, dup.field.parts[1])
        data[at : at + len(dup.name)] = twin.name.encode()
    return bytes(data)


DAMAGE = {  # kind -> what the one line must say
    "offset beyond the end": "beyond the file size",
    "unknown type id": "unknown ggml type 99",
    "size beyond the file": "beyond the file size",
    "overlapping tensors": "overlaps tensor",
    "string length 2^60": f"length {1 << 60} exceeds",
    "truncated key/values": "truncated at byte",
    "element count overflow": "more elements than an int64 counts",
    "n_tensors huge": f"header claims {1 << 62} tensors",
    "alignment 0": "general.alignment = 0",
    "duplicate tensor name": "duplicate tensor name",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_gguf_is_one_line_before_llama_cpp(valid_gguf: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_damage(kind, valid_gguf))
    result = _cli(["ppl", str(bad), "-c", "64", "--chunks", "1"])
    assert result.exit_code == 2, result.output
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: "), result.output
    assert DAMAGE[kind] in lines[0]


@pytest.mark.parametrize(
    "command", [["chat", "-p", "hi", "-n", "4"], ["bench", "-p", "8", "-n", "0", "-r", "1"]]
)
def test_chat_and_bench_refuse_a_damaged_gguf(valid_gguf: Path, tmp_path: Path, command: list[str]) -> None:
    """chat read only the key/values: a broken tensor table reached llama.cpp."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_damage("overlapping tensors", valid_gguf))
    result = _cli([command[0], str(bad), *command[1:]])
    assert result.exit_code == 2, result.output
    lines = _lines(result.stderr)
    assert len(lines) == 1 and str(bad) in lines[0] and "overlaps tensor" in lines[0], result.output


def test_undamaged_file_reads_as_gguf_py_reads_it(valid_gguf: Path) -> None:
    """The checks refuse only what is wrong: the valid file's table equals gguf-py's."""
    ours, theirs = read_gguf(valid_gguf), GGUFReader(valid_gguf)
    assert [(t.name, t.offset, t.nbytes) for t in ours.tensors.values()] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in theirs.tensors
    ]
