"""The solver streams the calibration windows through each layer: its statistics do not depend
on the batch split, and its peak memory does not grow with the MLP activations of all tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import qwen3, testing
from ggq.checkpoint import Checkpoint
from ggq.convert import ConvertOptions, make_plan
from ggq.plan import recipe as rc
from ggq.solvers.gptq import Target, gptq
from ggq.solvers.layerwise import LayerReport, SolverOptions, StatsStream, solve_layer
from ggq.solvers.reductions import GRAM_ROWS, gram


def _x(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_normal((rows, n)) * (1 + 3 * rng.random(n))).astype(np.float32))


@pytest.mark.parametrize("rows", [1000, 4096, 5000, 12288, 20000])
@pytest.mark.parametrize("piece", [256, 777, 4096])
def test_streamed_stats_are_the_whole_set_bits(rows: int, piece: int) -> None:
    """Against torch's own whole-set reductions and gram() of all rows: the same bits, whatever
    the pieces the rows come in (the solver's bytes must not depend on --batch)."""
    x = _x(rows, 160 if piece == 777 else 1024, seed=rows)
    s = StatsStream(rows, search_tokens=3000, full=True, sample=True, diag_tokens=100)
    for i in range(0, rows, piece):
        s.add(x[i : i + piece])
    st = s.result()
    stride = max(1, rows // 3000)
    assert np.array_equal(st.mean_sq, x.pow(2).mean(0).numpy())
    assert np.array_equal(st.mean_abs, x.abs().mean(0).numpy().astype(np.float64))
    whole = StatsStream(rows, search_tokens=3000, full=True, sample=False)
    whole.add(x)
    assert st.h_full is not None and np.array_equal(st.h_full, whole.result().h_full)
    assert np.array_equal(st.h_full, st.h_full.T)  # the upper triangle mirrored: exactly symmetric
    np.testing.assert_allclose(st.h_full, gram(x).numpy(), rtol=1e-5, atol=1e-5 * np.diag(st.h_full).max())
    assert st.h_sample is not None
    assert torch.equal(st.h_sample, gram(x[::stride], torch.float32).to(torch.float32))
    assert st.x_sample is not None and torch.equal(st.x_sample, x[:: max(1, rows // 100)])
    assert st.tokens == rows


def test_gram_into_adds_whole_chunks_in_order() -> None:
    x = _x(5 * GRAM_ROWS + 300, 200)
    acc = gram(x[: 2 * GRAM_ROWS])
    acc = gram(x[2 * GRAM_ROWS : 4 * GRAM_ROWS], into=acc)
    assert torch.equal(gram(x[4 * GRAM_ROWS :], into=acc), gram(x))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_in_place_is_the_copying_result(act_order: bool) -> None:
    x = _x(2048, 256)
    h = gram(x).numpy()
    w = (np.random.default_rng(1).standard_normal((64, 256)) * 0.02).astype(np.float32)
    ref = gptq(w, h, Target("Q4_K"), act_order=act_order)
    assert np.array_equal(h, gram(x).numpy())  # not overwritten by default
    own = h.copy()
    res = gptq(w, own, Target("Q4_K"), act_order=act_order, overwrite=True)
    assert np.array_equal(res.data, ref.data) and np.array_equal(res.weights, ref.weights)
    if not act_order:
        assert not np.array_equal(own, h)  # factorized in place


def test_gptq_in_place_raises_the_damping_from_the_original_hessian() -> None:
    """A failed in-place factorization destroys H: the retry must start again from H itself."""
    x = _x(100, 256).to(torch.float64)
    h = x.T @ x
    mean = float(h.diagonal().mean())
    h = (h - 1e-3 * mean * torch.eye(256, dtype=torch.float64)).numpy()  # not positive definite
    # the first damping whose Cholesky succeeds, tried on fresh copies (the definition)
    expected = next(
        d
        for d in (1e-5 * 10**k for k in range(6))
        if int(
            torch.linalg.cholesky_ex(torch.from_numpy(h) + d * mean * torch.eye(256, dtype=torch.float64))[1]
        )
        == 0
    )
    assert expected > 1e-5
    w = (np.random.default_rng(2).standard_normal((32, 256)) * 0.02).astype(np.float32)
    ref = gptq(w, h, Target("Q4_K"), damp=1e-5)
    res = gptq(w, h.copy(), Target("Q4_K"), damp=1e-5, overwrite=True)
    assert res.damp == ref.damp == expected
    assert np.array_equal(res.data, ref.data)


def test_float32_in_place_is_to_float32() -> None:
    from ggq.solvers.gptq import _float32_in_place

    t = _x(1000, 3001).to(torch.float64) * 1e-3
    ref = t.to(torch.float32)
    assert torch.equal(_float32_in_place(t.clone(), chunk=4096), ref)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer whose MLP is 16x its width: the MLP activations of all tokens would dominate."""
    spec = testing.Qwen3Spec(
        hidden_size=256, intermediate_size=4096, head_dim=64, num_hidden_layers=1, seed=9
    )
    return testing.build_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", spec)


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_bytes_do_not_depend_on_the_batch(wide: Path, method: str) -> None:
    ckpt = Checkpoint(wide)
    hp = ckpt.hparams
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions("Q4_K_M")))}
    h0 = torch.from_numpy(np.random.default_rng(3).standard_normal((24, 256, 256)).astype(np.float32))
    found = []
    for batch in (1, 5, 24):
        opts = SolverOptions(method=method, batch=batch)
        with torch.no_grad():
            out, res = solve_layer(
                h0.clone(),
                qwen3.load_layer(ckpt, 0),
                hp,
                qwen3.Rope.build(hp, 256),
                types,
                opts,
                LayerReport(0),
            )
        found.append((out, res))
    for out, res in found[1:]:
        assert torch.equal(out, found[0][0])
        assert res.tensors.keys() == found[0][1].tensors.keys()
        for k, v in res.tensors.items():
            assert np.array_equal(v, found[0][1].tensors[k]), k


PEAK = """
import json, sys
import numpy as np
from ggq.checkpoint import Checkpoint
from ggq.convert import ConvertOptions, make_plan
from ggq.plan import recipe as rc
from ggq.solvers import layerwise
from ggq.solvers.options import SolverOptions

ckpt = Checkpoint(sys.argv[1])
types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions("Q4_K_M")))}
tokens = np.random.default_rng(0).integers(0, ckpt.hparams.n_vocab, (int(sys.argv[3]), 256))
for _ in layerwise.solve_layers(ckpt, tokens, types, SolverOptions(method=sys.argv[2])):
    pass
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps(int(hwm.split()[1]) / 1024))
"""


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_peak_memory_is_flat_in_the_calibration_tokens(wide: Path, method: str) -> None:
    """16 -> 128 windows of 256 tokens: holding the MLP activations of all tokens (4096 wide,
    float32) would add 448 MiB; the residual stream (256 wide) adds 28 MiB and AWQ's strided
    search sample of the 256-wide inputs grows up to search_tokens (16384). The peak, sampled
    once per run, moves with allocation timing: measured +53 to +83 MiB for gptq and +52 to +109
    for awq at 16 -> 128 (and +58 for awq at 16 -> 64 windows, which failed a fresh-clone CI at a
    48 MiB bound). The bound is half of what the MLP activations would add."""
    peaks = []
    for nsamples in (16, 128):
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(wide), method, str(nsamples)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        peaks.append(json.loads(done.stdout.splitlines()[-1]))
    assert peaks[1] - peaks[0] < 224, peaks


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_residual_in_a_file_gives_the_same_bytes(wide: Path, method: str) -> None:
    """The residual stream kept in a temporary file (max_residual_bytes=0) instead of memory."""
    from ggq.solvers import layerwise

    ckpt = Checkpoint(wide)
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions("Q4_K_M")))}
    tokens = np.random.default_rng(0).integers(0, ckpt.hparams.n_vocab, (12, 128))
    found = []
    for limit in (0, 1 << 40):
        opts = SolverOptions(method=method, batch=5, max_residual_bytes=limit)
        found.append([r for _, r in layerwise.solve_layers(ckpt, tokens, types, opts)])
    for a, b in zip(*found, strict=True):
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            assert np.array_equal(a.tensors[k], b.tensors[k]), k


def test_no_room_for_the_residual_file_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from ggq.solvers.layerwise import Residual
    from ggq.solvers.options import SolverError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(
        SolverError, match=r"calibration activations: 0\.25 GiB to keep in .*, 0\.00 GiB free"
    ):
        Residual((64, 1024, 1024), "cpu", spill=True)


def _copying_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The definition: torch's factorizations on a row-major copy (what the solver did before)."""
    h = h.clone()
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    info = torch.zeros((), dtype=torch.int32)
    torch.set_num_threads(1)
    torch.linalg.cholesky_ex(h, out=(h, info))
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    return h


@pytest.mark.parametrize("n", [300, 1024, 2500])
@pytest.mark.parametrize("symmetric", [True, False])
def test_inverse_cholesky_in_place_is_the_copying_result(n: int, symmetric: bool) -> None:
    """In h's own memory (transposed into LAPACK's column-major layout and back) the factor has
    the bits of torch's copying calls, also where H's two triangles differ in their last bits."""
    from ggq.solvers.gptq import _inverse_cholesky, _transpose_in_place

    threads = torch.get_num_threads()
    h = gram(_x(n + 200, n, seed=n))
    if not symmetric:
        h = h + torch.triu(torch.full_like(h, 1e-9), 1)  # the upper triangle off by a little
    ref = _copying_inverse_cholesky(h, 0.01)
    torch.set_num_threads(threads)
    own = h.clone()
    got, damp = _inverse_cholesky(own, 0.01)
    assert damp == 0.01 and got.data_ptr() == own.data_ptr()
    assert torch.equal(got, ref)
    a = _x(n, n, seed=1)
    assert torch.equal(_transpose_in_place(a.clone(), tile=128), a.T)


INVERSE_PEAK = """
import json, sys
import torch
from ggq.solvers.gptq import _inverse_cholesky
from ggq.solvers.reductions import gram

n = int(sys.argv[1])
h = gram(torch.randn(n + 100, n, generator=torch.Generator().manual_seed(0)))
_inverse_cholesky(gram(torch.randn(300, 200)), 0.01)  # MKL's code pages are resident after
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
_inverse_cholesky(h, 0.01)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps((hwm - base) / 1024))
"""


def test_inverse_cholesky_holds_no_second_matrix() -> None:
    """torch's cholesky_ex / cholesky_inverse with a row-major out= each allocate a column-major
    n x n copy (measured: +1.2 GB at Qwen3-8B's ffn_down, the peak of a gptq layer)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    n = 4000  # 122 MiB float64
    done = subprocess.run(
        [sys.executable, "-c", INVERSE_PEAK, str(n)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    grew = json.loads(done.stdout.splitlines()[-1])
    assert grew < 0.25 * n * n * 8 / 2**20, grew


GPTQ_PEAK = """
import json, sys
import numpy as np, torch
from ggq.solvers.gptq import Target, gptq
from ggq.solvers.reductions import gram

rows, cols, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
h = gram(torch.from_numpy(rng.standard_normal((cols + 200, cols)).astype(np.float32))).numpy()
gptq(w[:64, :512].copy(), gram(torch.randn(600, 512)).numpy(), Target(target))  # code pages resident
open("/proc/self/clear_refs", "w").write("5")
base = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
gptq(w, h, Target(target), overwrite=True)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps((hwm - base) * 1024 / w.nbytes))
"""


def test_gptq_holds_one_group_of_decode_tables() -> None:
    """GPTQ's nearest-code tables are rows x codes floats per sub-block: kept for every group,
    Q6_K's (64 codes per 16 columns) were 11.7x the weight's bytes at 4096 x 3072 (measured),
    1.6 GB for Qwen3-8B's ffn_down. Released group by group, the whole call stays under 6x."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    done = subprocess.run(
        [sys.executable, "-c", GPTQ_PEAK, "2048", "2048", "Q6_K"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) < 6, done.stdout


@pytest.mark.parametrize("n", [300, 1025])
@pytest.mark.parametrize("block", [128, 512])
def test_upper_factor_factors_h_in_its_memory(n: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ's one factorization: H + damp x mean diagonal x I = M M^T with M upper triangular,
    against numpy's float64 product of the factor as gptq reads it; a singular H (rank n / 2)
    gets its damping raised, restarting from the original H (the result is the factor of H plus
    the damping reported, not of a matrix damped twice)."""
    from ggq.solvers import gptq as g

    monkeypatch.setattr(g, "FACTOR_BLOCK", block)
    for rank, damp in ((n + 50, 0.01), (n // 2, 1e-20)):
        h = gram(_x(rank, n, seed=n + rank))
        want = h.numpy().copy()
        own = h.clone()
        rt, used = g._upper_factor(own, damp)
        assert rt.data_ptr() == own.data_ptr() and used >= damp
        assert (used == damp) == (rank > n)
        want[np.diag_indices(n)] += used * float(np.diag(want).mean())
        d = torch.diag(rt).clone()
        m = g._m_rows(rt, d, 0, n).double() * d  # (n, n) M, its rows from _m_rows
        assert np.allclose(np.tril(m.numpy(), -1), 0)
        np.testing.assert_allclose((m @ m.T).numpy(), want, rtol=1e-5, atol=1e-6 * np.diag(want).max())
        threads = torch.get_num_threads()
        for t in (1, 3):  # the tasks' shapes are fixed: the bits do not depend on the threads
            torch.set_num_threads(t)
            try:
                again, _ = g._upper_factor(h.clone(), damp)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(torch.triu(again), torch.triu(rt)), t


def test_error_diagnostics_on_a_row_sample_are_llama_cpps_rtn_of_those_rows() -> None:
    """LayerReport.errors on a wide linear read every (rows // diag_rows)-th row: the RTN and
    solver errors equal, to float32 rounding, the relative output errors computed in float64 from
    llama.cpp's own quantize/dequantize of those rows alone (with AWQ column factors too), and a
    matrix under 2 x diag_rows rows is measured on all of its rows."""
    from ggq import ggml
    from ggq.solvers.layerwise import _diagnose
    from tests import ggml_ref

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1100, 256)) * 0.05).astype(np.float32)
    q = w + (rng.standard_normal(w.shape) * 0.002).astype(np.float32)  # a solver's weights
    xs = _x(64, 256, seed=4)
    cols = (0.5 + rng.random(256)).astype(np.float32)
    tid = ggml.get("Q4_K").type_id

    def want(rows: slice, c: np.ndarray | None) -> tuple[float, float]:
        ws, x = w[rows].astype(np.float64), xs.numpy().astype(np.float64)
        s = np.ones(256) if c is None else c.astype(np.float64)
        scaled = np.ascontiguousarray((w[rows] / s).astype(np.float32))
        rtn = ggml_ref.dequantize(ggml_ref.quantize(scaled, tid), tid, 256).astype(np.float64) * s
        ref = np.sum((x @ ws.T) ** 2)
        return tuple(float(np.sqrt(np.sum((x @ (ws - v).T) ** 2) / ref)) for v in (rtn, q[rows]))  # type: ignore[return-value]

    for c in (None, cols):
        got = _diagnose(w, q, "Q4_K", c, xs, 100)  # stride 11: rows 0, 11, ..., 1099
        np.testing.assert_allclose(got, want(slice(None, None, 11), c), rtol=1e-4)
        got_all = _diagnose(w[:150], q[:150], "Q4_K", c, xs, 100)  # 150 < 200 rows: all of them
        np.testing.assert_allclose(got_all, want(slice(0, 150), c), rtol=1e-4)
