"""Distillation into the exact blocks (ggq/solvers/distill.py, ``ggq convert --distill``).

References: ggml's own encoder and dequantizer at the pinned commit (tests/ggml_ref.py) for the
trained codes' bytes; llama.cpp's llama-perplexity for the written files; the KL divergence the
distiller reports against one computed here from transformers-free plain torch logits is not
needed: the held-out measure is checked for what it promises (the state written is the best).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import ggml, testing
from ggq.checkpoint import Checkpoint
from ggq.convert import CalibOptions, ConvertOptions, make_plan, prepare_calibration, solved_layers
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc
from ggq.solvers import distill
from ggq.solvers.options import BlockReport, DistillError, DistillOptions, check_distill
from tests import ggml_ref

GRID_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * (0.5 + rng.random(cols))).astype(np.float32) * 0.02


@pytest.mark.parametrize("type_name", GRID_TYPES)
def test_codes_decode_exactly_as_ggml_does(type_name: str) -> None:
    """Start: the grid reproduces ggml's decoding of the solver's bytes and packs them back
    unchanged. After moving the codes: the bytes written decode, by ggml itself, to exactly the
    weights the distillation used."""
    w = _weights(8, 512, 3)
    tid = ggml.get(type_name).type_id
    data = ggml_ref.quantize(w, tid)
    ct = distill.CodedTensor(data, type_name, w.shape[1])
    ref = ggml_ref.dequantize(data, tid, w.shape[1])
    np.testing.assert_array_equal(ct.weight().detach().numpy(), ref)
    np.testing.assert_array_equal(ct.to_bytes(), data.reshape(ct.to_bytes().shape))
    with torch.no_grad():
        ct.u.add_(
            torch.from_numpy(np.random.default_rng(4).uniform(-1.5, 1.5, ct.u.shape).astype(np.float32))
        )
    moved = ct.weight().detach().numpy()
    out = ct.to_bytes()
    assert not np.array_equal(out, data.reshape(out.shape))  # codes did change
    np.testing.assert_array_equal(ggml_ref.dequantize(out, tid, w.shape[1]), moved)
    np.testing.assert_array_equal(
        distill.CodedTensor(out, type_name, w.shape[1]).weight().detach().numpy(), moved
    )


@pytest.mark.parametrize("type_name", distill.SCALED_TYPES)
def test_trained_block_scales_decode_exactly_as_ggml_does(type_name: str) -> None:
    """Codes and d both moved: the bytes carry the new fp16 d, and ggml's own dequantization of
    them equals the weights the student computed (d * unit[code] in float32 is exact)."""
    w = _weights(8, 512, 7)
    tid = ggml.get(type_name).type_id
    data = ggml_ref.quantize(w, tid)
    ct = distill.CodedTensor(data, type_name, w.shape[1])
    assert ct.log_scale is not None
    rng = np.random.default_rng(8)
    with torch.no_grad():
        ct.u.add_(torch.from_numpy(rng.uniform(-1.5, 1.5, ct.u.shape).astype(np.float32)))
        ct.log_scale.add_(torch.from_numpy(rng.uniform(-0.05, 0.05, ct.log_scale.shape).astype(np.float32)))
    moved = ct.weight().detach().numpy()
    out = ct.to_bytes()
    size = ggml.get(type_name).type_size
    d_old, d_new = (x.reshape(-1, size)[:, :2] for x in (data, out))
    assert (d_old != d_new).any(axis=1).mean() > 0.5  # most blocks' d changed
    np.testing.assert_array_equal(ggml_ref.dequantize(out, tid, w.shape[1]), moved)


def test_gradient_passes_through_the_rounding_scaled_by_the_step() -> None:
    w = _weights(4, 64, 5)
    data = ggml.quantize(w, "Q4_0")
    ct = distill.CodedTensor(data, "Q4_0", 64)
    g = torch.from_numpy(np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32))
    (ct.weight() * g).sum().backward()
    # Q4_0 block: fp16 scale d, then 32 codes decoding to d * (code - 8): a code step is d
    d = np.ascontiguousarray(data.reshape(4, 2, 18)[:, :, :2]).view(np.float16).astype(np.float32)[..., 0]
    per_weight = np.repeat(d, 32, axis=1)  # (4, 64)
    assert ct.u.grad is not None
    grad = ct.u.grad.numpy()
    np.testing.assert_allclose(grad, g.numpy() * per_weight, rtol=1e-6, atol=0)
    # and to the block's scale: d(w)/d(log_scale) = w for the block's 32 weights (d * exp(s) at s = 0)
    assert ct.log_scale is not None and ct.log_scale.grad is not None
    want = (g.numpy() * ggml_ref.dequantize(data, ggml.get("Q4_0").type_id, 64)).reshape(4, 2, 32).sum(-1)
    np.testing.assert_allclose(ct.log_scale.grad.numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = testing.Qwen3Spec(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1024, seed=2
    )
    return testing.build_checkpoint(tmp_path_factory.mktemp("distill"), spec)


def _solved(
    ckpt: Checkpoint, opts: ConvertOptions
) -> tuple[dict[str, str], dict[str, np.ndarray], np.ndarray]:
    plan = make_plan(ckpt, opts)
    prep = prepare_calibration(ckpt, opts)
    solved: dict[str, np.ndarray] = {}
    for _, t in solved_layers(ckpt, plan, prep, opts, None, {}):
        solved.update(t)
    return {t.name: t.type for t in plan}, solved, prep.windows.tokens


def test_training_keeps_the_best_held_out_state(tiny: Path) -> None:
    ckpt = Checkpoint(tiny)
    opts = ConvertOptions(rc.RecipeOptions("Q4_0"), method="gptq", cal=CalibOptions(nsamples=16, seqlen=64))
    types, solved, tokens = _solved(ckpt, opts)
    d = distill.Distiller(ckpt, types, solved)
    seen: list[distill.StepReport] = []
    best = d.train(tokens, DistillOptions(steps=12, lr=0.05, eval_every=3, batch=4), seen.append)
    measured = [r.heldout_kld for r in seen if r.heldout_kld is not None]
    assert seen[0].step == 0 and len(measured) == 5  # step 0, 3, 6, 9, 12
    assert best == min(measured)
    rope = distill.qwen3.Rope.build(ckpt.hparams, tokens.shape[1])
    held = torch.from_numpy(tokens[-2:].astype(np.int64))  # 16 windows: the last 2 held out
    assert d.kld(held, rope, 4) == pytest.approx(best, rel=1e-6)
    assert all(np.isfinite(r.loss) for r in seen[1:])
    out = d.tensors()
    assert set(solved) <= set(out)
    for name, c in d.coded.items():
        np.testing.assert_array_equal(
            ggml_ref.dequantize(out[name], ggml.get(types[name]).type_id, c.shape[1]),
            c.weight().detach().numpy(),
        )


def test_block_phase_lowers_every_layers_held_out_error(tiny: Path) -> None:
    """Each layer's best held-out output error is at most its solver's (step 0 kept), lower for
    some layer; the bytes written decode, by ggml, to the trained weights; some Q4_0 d moved."""
    ckpt = Checkpoint(tiny)
    opts = ConvertOptions(rc.RecipeOptions("Q4_0"), method="gptq", cal=CalibOptions(nsamples=16, seqlen=64))
    types, solved, tokens = _solved(ckpt, opts)
    d = distill.Distiller(ckpt, types, solved)
    seen: list[BlockReport] = []
    d.train_blocks(tokens, DistillOptions(block_steps=20, eval_every=5, batch=4), seen.append)
    assert [r.layer for r in seen] == [0, 1]
    assert all(r.best <= r.first for r in seen) and any(r.best < 0.99 * r.first for r in seen)
    out = d.tensors()
    for name, c in d.coded.items():
        np.testing.assert_array_equal(
            ggml_ref.dequantize(out[name], ggml.get(types[name]).type_id, c.shape[1]),
            c.weight().detach().numpy(),
        )
    moved = [
        n
        for n in d.coded
        if not np.array_equal(out[n].reshape(-1, 18)[:, :2], solved[n].reshape(-1, 18)[:, :2])
    ]
    assert moved


def _convert(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["convert", str(model), "-o", str(out), "--method", "gptq", "--type", "Q4_0", "--force"]
    args += ["--nsamples", "16", "--seqlen", "64", *extra]
    return subprocess.run(
        [str(Path(sys.executable).with_name("ggq")), *args], capture_output=True, text=True, timeout=600
    )


def test_distilled_file_runs_in_llama_cpp_and_is_reproducible(
    tiny: Path, prose: Path, tmp_path: Path
) -> None:
    from tests.test_ppl import llama_perplexity

    a, b, plain = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "plain.gguf"
    both = ("--distill", "6", "--distill-blocks", "3")
    for path, extra in ((a, both), (b, both), (plain, ())):
        r = _convert(tiny, path, *extra, "--distill-lr", "0.05")
        assert r.returncode == 0, r.stderr[-2000:]
    assert a.read_bytes() == b.read_bytes()  # same inputs and seed, same bytes
    meta = read_gguf(a).metadata
    assert meta["ggq.calibration.distill_norm_lr"] == pytest.approx(DistillOptions.norm_lr)
    assert meta["ggq.calibration.distill_steps"] == 6 and meta["ggq.calibration.distill_lr"] == pytest.approx(
        0.05
    )
    assert meta["ggq.calibration.distill_block_steps"] == 3
    assert "ggq.calibration.distill_steps" not in read_gguf(plain).metadata
    ppl, _ = llama_perplexity(a, prose, n_ctx=64, chunks=4)
    assert np.isfinite(ppl) and ppl > 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--method", "rtn", "--distill", "5"), "--distill: starts from a calibration method"),
        (("--distill", "5", "--distill-lr", "0"), "--distill-lr 0"),
        (("--distill", "5", "--distill-lr", "3"), "--distill-lr 3"),
        (("--distill", "5", "--distill-lr", "nan"), "--distill-lr nan"),
        (("--distill", "5", "--nsamples", "1"), "at least 2 calibration windows"),
        (("--distill", "5", "--distill-norm-lr", "-1"), "--distill-norm-lr -1"),
        (("--distill-blocks", "5", "--distill-block-lr", "0"), "--distill-block-lr 0"),
        (("--method", "rtn", "--distill-blocks", "5"), "--distill: starts from a calibration method"),
    ],
)
def test_bad_distill_options_are_one_line(
    tiny: Path, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    out = tmp_path / "x.gguf"
    r = _convert(tiny, out, *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_negative_steps_are_a_usage_error(tiny: Path, tmp_path: Path) -> None:
    r = _convert(tiny, tmp_path / "x.gguf", "--distill", "-2")
    assert r.returncode == 2 and "Invalid value for '--distill'" in r.stderr


def test_check_distill_names_the_setting() -> None:
    with pytest.raises(DistillError, match="batch"):
        check_distill(DistillOptions(steps=3, batch=0), 8)
    check_distill(DistillOptions(steps=0), 1)  # off: any calibration size


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_distill_after_awq_runs_in_llama_cpp(tiny: Path, prose: Path, tmp_path: Path, method: str) -> None:
    """AWQ's solver hands over folded norms and linears as well: they are trained and written
    in place of the solver's (a K-quant mix: Q4_K and Q6_K grids)."""
    from tests.test_ppl import llama_perplexity

    out = tmp_path / "d.gguf"
    r = _convert(tiny, out, "--method", method, "--type", "Q4_K_M", "--distill", "4", "--distill-lr", "0.05")
    assert r.returncode == 0, r.stderr[-2000:]
    g = read_gguf(out)
    assert g.metadata["ggq.method"] == method and g.metadata["ggq.calibration.distill_steps"] == 4
    ppl, _ = llama_perplexity(out, prose, n_ctx=64, chunks=4)
    assert np.isfinite(ppl) and ppl > 1
