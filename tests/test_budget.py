"""Mixed types under a size budget (ggq.plan.budget, ggq.plan.sensitivity): the predicted file size
is the written file's, the knapsack is the brute-force optimum, the budget file fits and llama.cpp
runs it, and the sensitivity pass's float model is transformers' Qwen3."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader  # gguf-py: an independent parser

from ggq import ggml, native, testing
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import ConvertOptions, convert, file_kv, file_size, make_plan
from ggq.plan import budget as bud
from ggq.plan import sensitivity as sen
from ggq.plan.recipe import RecipeOptions

# k-quants apply; untied (output.weight and token_embd.weight both planned)
SPEC = replace(testing.WIDE, tie_word_embeddings=False, seed=11)
TIED = replace(SPEC, tie_word_embeddings=True, seed=12)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_checkpoint(tmp_path_factory.mktemp("budget"), SPEC)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_checkpoint(tmp_path_factory.mktemp("budget-tied"), TIED)


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7780000", 7780000),
        ("7.42MiB", int(7.42 * 2**20)),
        ("7.42M", int(7.42 * 2**20)),
        ("4.2G", int(4.2 * 2**30)),
        ("4.2 GiB", int(4.2 * 2**30)),
        ("512k", 512 * 1024),
        (".5K", 512),
    ],
)
def test_parse_size_is_1024_based(text: str, expected: int) -> None:
    assert bud.parse_size(text) == expected


@pytest.mark.parametrize("text", ["7.42MB", "4GB", "12 bytes", "-3M", "M", "", "1e6"])
def test_parse_size_refuses_unknown_units_naming_the_accepted_forms(text: str) -> None:
    with pytest.raises(bud.BudgetError, match=r"accepted: bytes .*KiB/MiB/GiB"):
        bud.parse_size(text)


def _random_overrides(
    ckpt: Checkpoint, opts: ConvertOptions, rng: random.Random
) -> tuple[tuple[str, str], ...]:
    plan = make_plan(ckpt, opts)
    return tuple(
        (t.name, rng.choice(bud.candidates(t.shape)))
        for t in plan
        if len(t.shape) == 2 and t.name.endswith("weight")
    )


def test_predicted_file_size_is_the_written_files_size(model: Path, tmp_path: Path) -> None:
    """Several mixed plans, key/values of every width (the ggq.plan.* keys included): the size
    computed before writing is os.path.getsize of the file convert writes, and gguf-py reads the
    types back as planned."""
    ckpt = Checkpoint(model)
    rng = random.Random(0)
    for k in range(4):
        opts = ConvertOptions(recipe=RecipeOptions(file_type=("Q4_K_M", "Q8_0", "Q2_K", "F16")[k]))
        kv = (
            ("budget", 10**k * 123457),
            ("target", "x" * k),
            ("predicted_kld", 0.25 * k),
            ("sensitivity", "ab"),
        )
        opts = replace(opts, tensor_overrides=_random_overrides(ckpt, opts, rng), plan_kv=kv)
        plan = make_plan(ckpt, opts)
        predicted = file_size(file_kv(ckpt, opts, {}), plan)
        out = tmp_path / f"p{k}.gguf"
        convert(ckpt, out, opts)
        assert predicted == out.stat().st_size
        got = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        assert got == {t.name: t.type for t in plan}
        assert len({t.type for t in plan if len(t.shape) == 2}) > 2  # really mixed


# --- allocation ----------------------------------------------------------------------------------


def _brute_force(budget: int, fixed: int, choices: list[bud.Choice]) -> float:
    """Least loss among every assignment within the budget, preferring those within FILL of it."""
    best_full, best_any = np.inf, np.inf
    for combo in itertools.product(*(range(len(c.types)) for c in choices)):
        size = fixed + sum(bud.padded(c.nbytes[k]) for c, k in zip(choices, combo, strict=True))
        if size > budget:
            continue
        loss = sum(c.loss[k] for c, k in zip(choices, combo, strict=True))
        best_any = min(best_any, loss)
        if size >= (1 - bud.FILL) * budget:
            best_full = min(best_full, loss)
    return best_full if np.isfinite(best_full) else best_any


def test_allocation_is_the_brute_force_optimum_and_never_over() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        choices = []
        for i in range(5):
            n = int(rng.integers(2, 5))
            sizes = np.sort(rng.integers(100, 3000, n))
            losses = np.sort(rng.random(n))[::-1] * rng.uniform(0.1, 10)
            choices.append(
                bud.Choice(f"t{i}", tuple(f"T{k}" for k in range(n)), tuple(map(int, sizes)), tuple(losses))
            )
        fixed = int(rng.integers(0, 500))
        lo, hi = bud.reachable(fixed, choices)
        budget = int(rng.integers(lo, hi + 1))
        a = bud.allocate(budget, fixed, choices)
        assert a.file_bytes <= budget, trial
        assert a.predicted_loss == pytest.approx(_brute_force(budget, fixed, choices), rel=1e-12), trial


def test_allocation_fills_the_budget_within_half_a_percent() -> None:
    """Many tensors of realistic relative sizes: every budget in the range is met within FILL."""
    rng = np.random.default_rng(1)
    types = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
    choices = []
    for i in range(60):
        shape = (256 * int(rng.integers(1, 4)), 256 * int(rng.integers(1, 8)))
        raw = rng.uniform(0.1, 3)
        choices.append(
            bud.Choice(
                f"t{i}",
                types,
                tuple(ggml.nbytes(t, shape) for t in types),
                tuple(raw * 2.0 ** (-2 * ggml.nbytes(t, shape) * 8 / np.prod(shape)) for t in types),
            )
        )
    lo, hi = bud.reachable(4096, choices)
    for budget in np.linspace(lo * 1.01, hi, 25).astype(int):
        a = bud.allocate(int(budget), 4096, choices)
        assert (1 - bud.FILL) * budget <= a.file_bytes <= budget


def test_candidates_follow_the_row_length() -> None:
    assert bud.candidates((256, 8)) == bud.CANDIDATES
    small = bud.candidates((96, 8))  # not a whole number of 256-blocks
    assert {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "F16"} == set(small)
    assert "IQ4_XS" not in bud.candidates((256, 8), frozenset(["Q4_K", "Q8_0"]))
    assert bud.candidates((17, 3)) == ("F16",)


# --- the sensitivity pass's model ----------------------------------------------------------------


def test_float_model_log_probs_equal_transformers(model: Path) -> None:
    """The probes' reference is transformers' Qwen3 itself: same log-probs on the same tokens;
    an unchanged tensor measures zero KLD, a quantized one a positive KLD."""
    from transformers import AutoModelForCausalLM

    from ggq.plan._float_model import FloatModel

    ckpt = Checkpoint(model)
    tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (2, 48))
    fm = FloatModel(ckpt, "cpu", 8)
    fm.prepare_probes(tokens)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.from_numpy(tokens)).logits, -1)
    for ours, theirs in zip(fm.ref, ref, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=2e-4)
    w = ckpt.load("blk.1.ffn_down.weight")
    assert fm.probe_kld("blk.1.ffn_down.weight", w) == 0.0
    assert fm.probe_kld("blk.1.ffn_down.weight", sen.quantized(w, "Q2_K", None)) > 0
    assert fm.probe_kld("output.weight", sen.quantized(ckpt.load("output.weight"), "Q2_K", None)) > 0


def test_gains_interpolate_over_layers_of_the_same_role() -> None:
    names = [f"blk.{i}.attn_q.weight" for i in range(5)] + ["output.weight"]
    g = sen.interpolate_gains(names, {"blk.0.attn_q.weight": 1.0, "blk.4.attn_q.weight": 16.0})
    assert g["blk.2.attn_q.weight"] == pytest.approx(4.0)
    assert g["output.weight"] == pytest.approx(np.median([1.0, 16.0]))


# --- end to end ----------------------------------------------------------------------------------


def _convert(args: list[str], cache: Path) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["convert", *args], env={"GGQ_CACHE": str(cache)})
    return r.exit_code, r.output


def _f16_file_size(ckpt: Checkpoint) -> int:
    """The size of ``ckpt``'s F16 file as the writer would write it."""
    f16 = ConvertOptions(recipe=RecipeOptions("F16"))
    return file_size(file_kv(ckpt, f16, {}), make_plan(ckpt, f16))


def _assert_llama_cpp_runs(path: Path) -> None:
    """llama.cpp loads ``path`` and gives finite logits for 8 tokens."""
    llama_cpp = native.import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval([1, 2, 3, 4, 5, 6, 7, 8])
    assert np.isfinite(np.array(llm.scores[:8])).all()
    llm.close()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq+gptq"])
def test_budget_file_fits_records_its_plan_and_llama_cpp_runs_it(
    model: Path, tied: Path, prose: Path, tmp_path: Path, method: str
) -> None:
    src = tied if method == "awq" else model
    ckpt = Checkpoint(src)
    f16 = _f16_file_size(ckpt)
    budget = int(f16 * 0.3)
    out = tmp_path / f"{method}.gguf"
    calib = ["--calib", str(prose), "--nsamples", "8", "--seqlen", "64", "--device", "cpu"]
    code, log = _convert(
        [str(src), "--method", method, "--target-size", str(budget), "-o", str(out), *calib], tmp_path
    )
    assert code == 0, log
    size = out.stat().st_size
    assert (1 - bud.FILL) * budget <= size <= budget
    r = GGUFReader(out)
    kv = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("ggq.plan.")}
    assert kv["ggq.plan.budget"] == budget
    assert kv["ggq.plan.predicted_kld"] > 0
    types = {t.tensor_type.name for t in r.tensors if len(t.shape) == 2}
    assert len(types) >= 2, types
    _assert_llama_cpp_runs(out)
    # a second plan for another budget reads the cached measurement
    code, log = _convert(
        [str(src), "--method", method, "--target-size", str(budget * 2), "--dry-run", *calib], tmp_path
    )
    assert code == 0 and "cached" in log, log


def test_budget_out_of_range_and_bad_units_are_one_line(model: Path, prose: Path, tmp_path: Path) -> None:
    calib = ["--calib", str(prose), "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--dry-run"]
    for target, expected in (
        ("10K", "reachable range"),
        ("1G", "reachable range"),
        ("3MB", "accepted: bytes"),
    ):
        code, log = _convert([str(model), "--target-size", target, *calib], tmp_path)
        assert code == 2, log
        line = log.strip()
        assert "\n" not in line and expected in line and "--target-size" in line, log
    code, log = _convert([str(model), "--target-size", "1M", "--target-bpw", "4", *calib], tmp_path)
    assert code == 2 and "give one of them" in log


def test_target_bpw_is_bits_over_every_weight_of_the_file(model: Path, prose: Path, tmp_path: Path) -> None:
    import json

    calib = ["--calib", str(prose), "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]
    code, log = _convert([str(model), "--target-bpw", "4.5", "--dry-run", "--json", *calib], tmp_path)
    assert code == 0, log
    out = json.loads(log[log.index("{") :])
    n = sum(int(np.prod(t["shape"])) for t in out["tensors"])
    assert out["budget"]["budget"] == int(4.5 * n / 8)
    assert (1 - bud.FILL) * out["budget"]["budget"] <= out["budget"]["file_bytes"] <= out["budget"]["budget"]


def test_moe_float_model_is_transformers_and_prices_each_expert(checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Qwen3-MoE: the probes' reference log-probs are transformers' Qwen3MoeForCausalLM's; a merged
    expert tensor's raw loss is the sum of its experts' (each on its own routed, routing-weighted
    rows: quantizing one expert alone costs a part of the whole), falls with the type's bits, and
    its probe measures zero KLD unchanged, more quantized."""
    from transformers import AutoModelForCausalLM

    from ggq.plan._float_model import FloatModel

    path = checkpoint("moe-4")
    ckpt = Checkpoint(path)
    hp = ckpt.hparams
    tokens = np.random.default_rng(0).integers(0, hp.n_vocab, (4, 48))
    fm = FloatModel(ckpt, "cpu", 2)
    fm.prepare_probes(tokens[:2])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.from_numpy(tokens[:2])).logits, -1)
    for ours, theirs in zip(fm.ref, ref, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=2e-4)
    stats = fm.calibrate(tokens)
    name = "blk.3.ffn_down_exps.weight"
    w = ckpt.load(name)  # (E, rows, n)
    assert stats.h_of(name).shape == (hp.n_expert, w.shape[2], w.shape[2])
    losses = {t: stats.loss(name, w - sen.quantized(w, t, None), False) for t in ("Q2_K", "Q4_K", "Q8_0")}
    assert losses["Q2_K"] > losses["Q4_K"] > losses["Q8_0"] > 0, losses
    e = w - sen.quantized(w, "Q4_K", None)
    parts = []
    for k in range(hp.n_expert):
        only = np.zeros_like(e)
        only[k] = e[k]
        parts.append(stats.loss(name, only, False))
    assert min(parts) > 0 and sum(parts) == pytest.approx(losses["Q4_K"], rel=1e-9)
    assert fm.probe_kld(name, w) == 0.0
    assert (
        fm.probe_kld(name, sen.quantized(w, "Q2_K", None))
        > fm.probe_kld(name, sen.quantized(w, "Q4_K", None))
        > 0
    )


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
def test_moe_budget_file_fits_and_llama_cpp_runs_it(
    checkpoint, prose: Path, tmp_path: Path, method: str
) -> None:  # type: ignore[no-untyped-def]
    """A Qwen3-MoE budget file: within the budget, its experts' merged tensors each one type (of
    the plan), the router kept in F32, and llama.cpp runs it."""
    src = checkpoint("moe-4")
    ckpt = Checkpoint(src)
    f16 = _f16_file_size(ckpt)
    budget = int(f16 * 0.3)
    out = tmp_path / f"moe-{method}.gguf"
    calib = ["--calib", str(prose), "--nsamples", "8", "--seqlen", "64", "--device", "cpu"]
    code, log = _convert(
        [str(src), "--method", method, "--target-size", str(budget), "-o", str(out), *calib], tmp_path
    )
    assert code == 0, log
    assert (1 - bud.FILL) * budget <= out.stat().st_size <= budget
    r = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    experts = {n: t for n, t in types.items() if "_exps." in n}
    assert len(experts) == 3 * ckpt.hparams.n_layer and len(set(experts.values())) >= 2, experts
    assert all(t == "F32" for n, t in types.items() if "ffn_gate_inp" in n)
    _assert_llama_cpp_runs(out)


def test_gptq_methods_are_priced_by_gptqs_own_error(model: Path) -> None:
    """For the GPTQ methods the raw loss of a layer linear is GPTQ's error on the float model's H,
    not RTN's: lower at every type GPTQ can target, and the probe (the float model with that one
    tensor quantized, measured by its KLD) quantizes the same way, so it measures less KLD too."""
    ckpt = Checkpoint(model)
    tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (8, 64))
    names = [f"blk.{i}.{r}.weight" for i in range(SPEC.num_hidden_layers) for r in ("attn_q", "ffn_down")]
    types = {n: bud.candidates(ckpt.load(n).shape, None) for n in names}
    got = {
        err: sen.measure(ckpt, tokens, types, sen.SensitivitySettings("calibration", error=err), "k")
        for err in ("rtn", "gptq")
    }
    from ggq.solvers.options import supported_types

    for n in names:
        for t in types[n]:
            g, r = got["gptq"].raw[n][t], got["rtn"].raw[n][t]
            if t in supported_types():
                assert g < r, (n, t, g, r)
            else:  # IQ4_XS (no GPTQ grid) and F16: as RTN prices them
                assert g == r, (n, t)
        assert got["gptq"].probes[n][1] < got["rtn"].probes[n][1], n
