"""Same inputs and seed give the same bytes whatever the thread count.

On the CPU build of torch (MKL, OpenMP) a long sum's last bits depend on the thread count: X^T X
over 8192 tokens differs between 1 and 2 threads, as do MKL's Cholesky and LU factorizations.
The solvers take those sums in a fixed order (ggq/solvers/reductions.py), and ggq turns on MKL's
strict reproducibility mode for the other products (ggq/__init__.py). Two checks:

- the files: ``ggq convert`` in separate processes, one with OMP/MKL at 1 thread and one encoder
  thread, one with torch at all cores (at least 2) and the default encoder pool, give the same
  bytes for gptq, awq and awq+gptq at k-quant types with --act-order, and for gptq once more with
  MKL's AVX2 kernels (a CPU without AVX-512, where plain products depend on the thread count);
- the floats under the files: every statistic and search result the solvers decide on is the
  same bit for bit at 1, 2 and 4 torch threads (4 oversubscribes a 2-core machine), on inputs
  long enough that plain products differ. Bytes hide most last-bit differences (GPTQ rounds in
  float32), so this is the check that fails first when a sum starts to depend on threads.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import qwen3, testing
from ggq.checkpoint import Checkpoint
from ggq.convert import ConvertOptions, make_plan
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc
from ggq.solvers import awq
from ggq.solvers.layerwise import InputStats, LayerReport, SolverOptions, solve_layer
from ggq.solvers.reductions import (
    GRAM_COLS,
    GRAM_ROWS,
    MM_COLS,
    fixed_order,
    gram,
    mm,
    mm_add,
    one_thread,
    threads,
    total,
)

WIDE = replace(testing.WIDE, num_hidden_layers=1, tie_word_embeddings=False, seed=11)
# the last case runs MKL with its AVX2 kernels, as on a CPU without AVX-512: there, without
# MKL's strict reproducibility mode (ggq/__init__.py), the attention forward's products split
# their sums by the thread count and the gptq file differed (measured on this code before the fix)
CASES = (
    ("gptq", "Q4_K_M", None),
    ("awq", "Q3_K_M", None),
    ("awq+gptq", "Q4_K_M", None),
    ("gptq", "Q4_K_M", "AVX2"),
)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# the console script with torch's threads set first: a count above the cores is reachable this
# way only (torch caps OMP_NUM_THREADS at the core count)
WITH_TORCH_THREADS = "import sys, torch; torch.set_num_threads(int(sys.argv.pop(1))); from ggq.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_checkpoint(tmp_path_factory.mktemp("wide"), WIDE)


def _convert(
    model: Path,
    out: Path,
    method: str,
    qtype: str,
    torch_threads: int | None,
    encoders: int,
    isa: str | None = None,
) -> None:
    """``ggq convert`` in a fresh process: OMP/MKL at 1 thread (``torch_threads`` None) or torch
    at ``torch_threads`` with the thread variables unset; ``isa``: MKL's instruction set."""
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARS, "MKL_CBWR")}
    if isa is not None:
        env["MKL_ENABLE_INSTRUCTIONS"] = isa
    args = ["convert", str(model), "-o", str(out), "--method", method, "--type", qtype, "--act-order"]
    args += ["--nsamples", "8", "--seqlen", "256", "--seed", "3", "--threads", str(encoders)]
    if torch_threads is None:
        env.update(dict.fromkeys(THREAD_VARS, "1"))
        cmd = [str(Path(sys.executable).with_name("ggq")), *args]
    else:
        cmd = [sys.executable, "-c", WITH_TORCH_THREADS, str(torch_threads), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _differences(a: Path, b: Path) -> list[str]:
    """Keys and tensors that differ between two GGUF files, for the failure message."""
    ga, gb = read_gguf(a), read_gguf(b)
    keys = sorted(
        k
        for k in ga.metadata.keys() | gb.metadata.keys()
        if repr(ga.metadata.get(k)) != repr(gb.metadata.get(k))  # values may be arrays
    )
    tensors = [
        n
        for n in ga.tensors
        if n not in gb.tensors or ga.tensor_data(n).tobytes() != gb.tensor_data(n).tobytes()
    ]
    return keys + tensors


def _cpu() -> str:
    """The CPU's model name, for the failure message (the CI's machines vary)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")


@pytest.mark.parametrize(("method", "qtype", "isa"), CASES)
def test_convert_bytes_do_not_depend_on_threads(
    wide: Path, tmp_path: Path, method: str, qtype: str, isa: str | None
) -> None:
    many = max(2, os.cpu_count() or 1)
    one_path, many_path = tmp_path / "one" / "x.gguf", tmp_path / "many" / "x.gguf"
    one_path.parent.mkdir()
    many_path.parent.mkdir()
    _convert(wide, one_path, method, qtype, None, encoders=1, isa=isa)
    _convert(wide, many_path, method, qtype, many, encoders=0, isa=isa)
    one, other = one_path.read_bytes(), many_path.read_bytes()
    if one != other:  # not a plain assert: pytest's diff of two multi-MB bytes objects takes minutes
        pytest.fail(f"1 vs {many} threads on {_cpu()}: {_differences(one_path, many_path)}")
    meta = read_gguf(one_path).metadata
    assert meta["ggq.method"] == method and meta["ggq.calibration.seed"] == 3
    assert not [k for k in meta if any(w in k for w in ("thread", "device", "time", "host", "path"))]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _digest(*arrays: object) -> str:
    h = hashlib.sha256()
    for a in arrays:
        t = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()[:16]


def _solver_floats(ckpt: Checkpoint) -> dict[str, str]:
    """Digests of what the solvers decide on, for inputs of 12288 tokens (plain X^T X over
    8192 tokens already differs between 1 and 2 threads)."""
    rng = np.random.default_rng(7)
    x = torch.from_numpy((rng.standard_normal((12288, 256)) * (1 + 3 * rng.random(256))).astype(np.float32))
    w = (rng.standard_normal((512, 256)) * 0.02).astype(np.float32)
    st = InputStats.of(x, search_tokens=16384, full=True)
    out = {
        "h_full": _digest(st.h_full),
        "h_sample": _digest(st.h_sample),
        "means": _digest(st.mean_abs, st.mean_sq),
        "awq.output_error": _digest(
            awq.output_error([(w, "Q4_K")], st.h_sample, st.mean_sq, np.ones(256, np.float32))
        ),
        "awq.clip_search": _digest(awq.clip_search(w, "Q4_K", st.mean_sq, st.h_sample)),
        "awq.refit_norm": _digest(awq.refit_norm([(w, awq.quantized_weights(w, "Q4_K", None))], st.h_sample)),
    }
    hp = ckpt.hparams
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions("Q4_K_M")))}
    h = torch.from_numpy(
        rng.standard_normal((16, 512, 256)).astype(np.float32)
    )  # (B, T, n_embd): 8192 tokens
    opts = SolverOptions(method="awq+gptq", act_order=True)
    with torch.no_grad():
        layer_out, res = solve_layer(
            h, qwen3.load_layer(ckpt, 0), hp, qwen3.Rope.build(hp, 512), types, opts, LayerReport(0)
        )
    out["solve_layer.output"] = _digest(layer_out)
    out["solve_layer.tensors"] = _digest(*(res.tensors[k] for k in sorted(res.tensors)))
    out["solve_layer.act_sums"] = _digest(*(res.act_sums[k][0] for k in sorted(res.act_sums)))
    return out


def test_solver_floats_do_not_depend_on_threads(wide: Path) -> None:
    ckpt = Checkpoint(wide)
    found = {}
    for n in (1, 2, 4):
        with _threads(n):
            found[n] = _solver_floats(ckpt)
    for n in (2, 4):
        assert found[n] == found[1], (
            f"differ at {n} threads: {[k for k in found[1] if found[n][k] != found[1][k]]}"
        )


def test_one_thread_pins_the_factorizations() -> None:
    """GPTQ's inverse Cholesky and the AWQ norm refit's solve run under one_thread(): MKL's
    factorizations differ between 1, 2 and 4 threads even at n = 256 (their last bits reach
    the files only by rare chance, through float32 roundings), and the pin must hold them to
    the bits of one thread whatever the caller's count."""
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((1024, 256)))
    h = x.T @ x + 0.01 * torch.eye(256, dtype=torch.float64)  # (256, 256) positive definite
    before = torch.get_num_threads()
    found = {}
    for n in (1, 2, 4):
        with _threads(n), one_thread():
            upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
            found[n] = _digest(upper, torch.linalg.solve(h, torch.ones(256, dtype=torch.float64)))
    assert found[2] == found[1] and found[4] == found[1]
    assert torch.get_num_threads() == before


def test_gram_and_total_are_the_plain_sums() -> None:
    """The fixed-order sums are the sums: against numpy's float64 X^T X and math.fsum, with a
    row count that is not a whole number of chunks and a width that is not one of column blocks."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2 * GRAM_ROWS + 77, GRAM_COLS + 40)).astype(np.float32)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(gram(torch.from_numpy(x)).numpy(), ref, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(gram(torch.from_numpy(x), torch.float32).numpy(), ref, rtol=1e-5, atol=1e-2)
    assert gram(torch.from_numpy(x[:0])).shape == (x.shape[1], x.shape[1])
    assert total(torch.from_numpy(x)) == pytest.approx(math.fsum(x.astype(np.float64).ravel()), rel=1e-12)


def test_mm_under_fixed_order_is_one_thread_per_tile() -> None:
    """Under fixed_order() torch runs on one thread and mm() is, bit for bit, the one-thread
    products of its MM_COLS-wide output tiles, whatever the caller's thread count (1, 2, 4);
    outside it mm() is the plain product. A width that is not whole tiles and a 3-d input."""
    rng = np.random.default_rng(10)
    a = torch.from_numpy(rng.standard_normal((3, 700, 384)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((2 * MM_COLS + 77, 384)).astype(np.float32)).T  # (k, n) view
    n = b.shape[1]
    with _threads(1):
        tiles = [a.reshape(-1, 384) @ b[:, j : j + MM_COLS] for j in range(0, n, MM_COLS)]
    ref = torch.cat(tiles, dim=1).view(3, 700, n)
    before = torch.get_num_threads()
    for count in (1, 2, 4):
        with _threads(count), fixed_order():
            assert torch.get_num_threads() == 1 and threads() == count
            with fixed_order():  # nested: the outer caller's count stays
                assert threads() == count
            got = mm(a, b)
        assert torch.equal(got, ref), f"mm at {count} threads is not the one-thread tiles"
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(mm(a, b).numpy(), (a @ b).numpy(), rtol=1e-4, atol=1e-4)


def test_mm_add_under_fixed_order_is_one_thread_per_tile() -> None:
    """mm_add(c, a, b) under fixed_order() is, bit for bit, each MM_COLS-wide column tile of c
    updated by one single-threaded addmm at any caller thread count, on a strided view of c (the
    columns GPTQ updates); outside it c += a @ b. Both are c + a @ b to float32 rounding."""
    rng = np.random.default_rng(11)
    a = torch.from_numpy(rng.standard_normal((300, 96)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((96, 2 * MM_COLS + 50)).astype(np.float32))
    base = torch.from_numpy(rng.standard_normal((300, 2 * MM_COLS + 90)).astype(np.float32))
    n = b.shape[1]
    ref = base.clone()
    with _threads(1):
        for j in range(0, n, MM_COLS):
            ref[:, 40 + j : 40 + min(j + MM_COLS, n)].addmm_(a, b[:, j : j + MM_COLS])
    for count in (1, 2, 4):
        got = base.clone()
        with _threads(count), fixed_order():
            mm_add(got[:, 40:], a, b)
        assert torch.equal(got, ref), f"mm_add at {count} threads is not the one-thread tiles"
    plain = base.clone()
    mm_add(plain[:, 40:], a, b)
    want = base.numpy().astype(np.float64)
    want[:, 40:] += a.numpy().astype(np.float64) @ b.numpy().astype(np.float64)
    for c in (ref, plain):
        np.testing.assert_allclose(c.numpy(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(ref[:, :40], base[:, :40])


def test_solve_layer_runs_torch_on_one_thread(wide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GPTQ and AWQ decision of a layer is taken with torch on one thread (the products'
    parallelism is mm()'s fixed tiles): the thread count torch reports inside the layer's
    forwards and searches, sampled where they call into qwen3, is 1 at a caller's count of 2."""
    ckpt = Checkpoint(wide)
    hp = ckpt.hparams
    seen: list[int] = []
    real = qwen3.attention_core

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(qwen3, "attention_core", spy)
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions("Q4_K_M")))}
    h = torch.from_numpy(np.random.default_rng(12).standard_normal((2, 64, hp.n_embd)).astype(np.float32))
    with _threads(2), torch.no_grad():
        solve_layer(
            h,
            qwen3.load_layer(ckpt, 0),
            hp,
            qwen3.Rope.build(hp, 64),
            types,
            SolverOptions(method="awq+gptq"),
            LayerReport(0),
        )
        assert torch.get_num_threads() == 2
    assert seen and set(seen) == {1}
