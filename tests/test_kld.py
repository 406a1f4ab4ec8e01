"""`ggq ppl --base`: KL-divergence in one pass over two models, against llama.cpp's own two-step
``llama-perplexity --kl-divergence-base`` / ``--kl-divergence`` on the same files, text and context;
`--vs-q4_0` against the Q4_0 that llama-quantize itself writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggq import native
from ggq.cli import main
from ggq.eval import llama_tools
from ggq.eval.kld import KldAccumulator
from tests.test_convert import to_gguf
from tests.test_ppl import ppl_error

# statistics both tools print; ours must round to the digits llama-perplexity prints
STATS = (
    "ppl",
    "ppl_err",
    "ppl_base",
    "ppl_base_err",
    "ln_ppl_ratio",
    "ln_ppl_ratio_err",
    "kld",
    "kld_err",
    "kld_median",
    "kld_p90",
    "kld_p95",
    "kld_p99",
    "kld_p999",
    "kld_max",
    "dp_mean",
    "dp_mean_err",
    "dp_max",
    "dp_rms",
    "dp_rms_err",
    "same_top",
    "same_top_err",
)
# the tool prints Δp and same top p in percent with 3 decimals (1e-5 as a fraction), the rest with 6
LAST_DIGIT = {k: 1e-5 if k.startswith(("dp_", "same_top")) else 1e-6 for k in STATS}


def ggq_kld(model: Path, base: Path, text: Path, n_ctx: int, chunks: int, *extra: str) -> dict:
    args = ["ppl", str(model), "--base", str(base), "-f", str(text), "-c", str(n_ctx)]
    result = CliRunner().invoke(main, [*args, "--chunks", str(chunks), "-t", "2", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_same_stats(ours: dict, ref: dict) -> None:
    """Each of our statistics equals llama-perplexity's printed value within one unit of its last
    printed digit (1e-6, or 1e-3 percentage points): the printed digits, up to rounding of the
    last one. (Half a unit is too strict for PPL ~1000: 6 decimals are 10 significant digits, and
    the two tools accumulate in different orders, e.g. 1008.3908560 against 1008.390855.)"""
    wrong = {
        key: (ours[key], ref[key])
        for key in STATS
        if abs(ours[key] - ref[key]) > LAST_DIGIT[key] * (1 + 1e-6)
    }
    assert not wrong, wrong


@pytest.fixture(scope="module")
def tied(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("kld-tied")
    return {t: to_gguf(checkpoint("tied"), out / f"tied-{t}.gguf", t) for t in ("F32", "Q4_0", "Q8_0")}


@pytest.mark.parametrize("file_type", ["Q4_0", "Q8_0"])
def test_fixture_kld_equals_llama_perplexity(
    tied: dict[str, Path], prose: Path, file_type: str, tmp_path: Path
) -> None:
    base_file = llama_tools.kld_base(tied["F32"], prose, tmp_path / "base.kld", n_ctx=128, chunks=6)
    ref = llama_tools.kld_stats(tied[file_type], base_file, n_ctx=128, chunks=6)
    doc = ggq_kld(tied[file_type], tied["F32"], prose, 128, 6)
    row = next(r for r in doc["rows"] if r["role"] == "model")
    assert row["n_scored"] == 6 * 63
    assert_same_stats(row["kld"], ref)
    assert row["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)


def test_qwen3_micro_kld_equals_llama_perplexity(qwen3_micro: Path, heldout: Path, tmp_path: Path) -> None:
    """The trained model at ctx 512: 4 chunks per decode, 16,384-token rows, a real Q4_0 error."""
    f32 = to_gguf(qwen3_micro, tmp_path / "micro-F32.gguf")
    q4 = to_gguf(qwen3_micro, tmp_path / "micro-Q4_0.gguf", "Q4_0")
    text = heldout
    ref = llama_tools.kld_stats(q4, llama_tools.kld_base(f32, text, tmp_path / "b.kld", chunks=6), chunks=6)
    doc = ggq_kld(q4, f32, text, 512, 6)
    rows = {r["role"]: r for r in doc["rows"]}
    assert_same_stats(rows["model"]["kld"], ref)
    assert 0.001 < rows["model"]["kld"]["kld"] < 0.1  # a real, non-trivial divergence was compared
    # the base row is the plain protocol: the same estimate as `ggq ppl` of the base alone
    plain = CliRunner().invoke(main, ["ppl", str(f32), "-f", str(text), "--chunks", "6", "--json"])
    alone = json.loads(plain.stdout)["rows"][0]
    assert rows["base"]["ppl"] == pytest.approx(alone["ppl"], rel=1e-9)
    assert rows["base"]["ppl_err"] == pytest.approx(alone["ppl_err"], rel=1e-7)


def test_several_models_in_one_pass_equal_one_at_a_time(tied: dict[str, Path], prose: Path) -> None:
    both = ggq_kld(tied["Q4_0"], tied["F32"], prose, 128, 4, str(tied["Q8_0"]))  # extra model argument
    one = ggq_kld(tied["Q8_0"], tied["F32"], prose, 128, 4)
    by_file = {r["file"]: r for r in both["rows"]}
    assert set(by_file) == {"tied-F32.gguf", "tied-Q4_0.gguf", "tied-Q8_0.gguf"}
    q8 = next(r for r in one["rows"] if r["file"] == "tied-Q8_0.gguf")
    assert by_file["tied-Q8_0.gguf"]["kld"] == q8["kld"]
    assert by_file["tied-Q4_0.gguf"]["kld"]["kld"] > q8["kld"]["kld"] > 0
    sizes = [r["size_mib"] for r in both["rows"]]
    assert sizes == sorted(sizes)


def test_vs_q4_0_is_llama_quantizes_file_cached(
    tied: dict[str, Path], prose: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GGQ_CACHE", str(tmp_path / "cache"))
    plot = tmp_path / "plot.png"
    doc = ggq_kld(tied["Q8_0"], tied["F32"], prose, 128, 4, "--vs-q4_0", "--plot", str(plot))
    rows = {r["role"]: r for r in doc["rows"]}
    assert set(rows) == {"base", "model", "llama.cpp Q4_0"}
    assert rows["llama.cpp Q4_0"]["type"] == "Q4_0" and rows["base"]["type"] == "F32"
    # the baseline's bytes are llama-quantize's own
    cached = list((tmp_path / "cache" / "baselines").glob("*.gguf"))
    assert len(cached) == 1
    ref = tmp_path / "ref-q4_0.gguf"
    done = subprocess.run(
        [str(native.tool_path("llama-quantize")), str(tied["F32"]), str(ref), "Q4_0"], capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert cached[0].read_bytes() == ref.read_bytes()
    assert rows["llama.cpp Q4_0"]["kld"]["kld"] > rows["model"]["kld"]["kld"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    # a second run reuses the cached file
    mtime = cached[0].stat().st_mtime_ns
    ggq_kld(tied["Q8_0"], tied["F32"], prose, 128, 2, "--vs-q4_0")
    assert cached[0].stat().st_mtime_ns == mtime


def test_table_shows_every_file_with_kld(tied: dict[str, Path], prose: Path) -> None:
    args = [
        "ppl",
        str(tied["Q8_0"]),
        "--base",
        str(tied["F32"]),
        "-f",
        str(prose),
        "-c",
        "128",
        "--chunks",
        "3",
    ]
    result = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if ".gguf" in line and "│" in line]
    assert len(lines) == 2 and "tied-Q8_0.gguf" in lines[0] and "tied-F32.gguf (base)" in lines[1]
    assert "%" in lines[0] and "±" in lines[0]


def test_vs_q4_0_needs_a_float_base(tied: dict[str, Path], prose: Path) -> None:
    message = ppl_error(
        str(tied["F32"]), "--base", str(tied["Q8_0"]), "--vs-q4_0", "-f", str(prose), "-c", "128"
    )
    assert "tied-Q8_0.gguf: --vs-q4_0 needs a F32, F16 or BF16 base" in message
    assert "needs --base" in ppl_error(str(tied["F32"]), "--vs-q4_0", "-f", str(prose), "-c", "128")


def test_different_vocabularies_are_refused(
    checkpoint, tied: dict[str, Path], prose: Path, tmp_path: Path
) -> None:
    other = to_gguf(checkpoint("full-vocab"), tmp_path / "full-vocab.gguf", "Q8_0")
    message = ppl_error(
        str(other), "--base", str(tied["F32"]), "-f", str(prose), "-c", "128", "--chunks", "2"
    )
    assert "full-vocab.gguf: vocabulary of 151936 tokens, but the base" in message


def test_gpu_layers_need_a_gpu(tied: dict[str, Path], prose: Path) -> None:
    """Without a GPU in the build, asking for GPU layers is one line; with one, they are used."""
    args = [str(tied["F32"]), "-f", str(prose), "-c", "128", "--chunks", "2", "--gpu-layers", "99"]
    if not any(d["type"] in ("gpu", "igpu") for d in native.load().devices()):
        assert "--gpu-layers 99: no GPU available" in ppl_error(*args)
        return
    result = CliRunner().invoke(main, ["ppl", *args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["ppl"] > 1


def test_dataset_names_the_shipped_text(tied: dict[str, Path]) -> None:
    assert "--dataset c4: unknown; available: wikitext-2" in ppl_error(str(tied["F32"]), "--dataset", "c4")


def test_kld_kernel_agrees_with_float64_on_plain_arrays() -> None:
    """Rows within 16 nats of their maximum (no clamping): the 16-bit storage of the base costs
    at most ~1e-4 in each log-probability, so KLD and NLLs agree with exact float64 arithmetic."""
    rng = np.random.default_rng(1)
    for n_vocab in (1000, 1003):
        q = (rng.standard_normal((64, n_vocab)) * 1.5).astype(np.float32)
        b = (q + 0.2 * rng.standard_normal((64, n_vocab))).astype(np.float32)
        t = rng.integers(0, n_vocab, 64).astype(np.int32)
        out = native.load().kld_rows(q, b, t, 2)

        def log_softmax(x: np.ndarray) -> np.ndarray:
            x = x.astype(np.float64) - x.max(1, keepdims=True)
            return x - np.log(np.exp(x).sum(1, keepdims=True))

        lq, lb = log_softmax(q), log_softmax(b)
        rows = np.arange(64)
        np.testing.assert_allclose(out["kld"], (np.exp(lb) * (lb - lq)).sum(1), rtol=0.01, atol=2e-5)
        np.testing.assert_allclose(out["nll"], -lq[rows, t], rtol=1e-5)
        np.testing.assert_allclose(out["nll_base_exact"], -lb[rows, t], rtol=1e-6)
        np.testing.assert_allclose(out["nll_base"], -lb[rows, t], atol=3e-4)
        assert (out["same_top"] == (q.argmax(1) == b.argmax(1))).all()
        np.testing.assert_allclose(out["p_diff"], np.exp(-out["nll"]) - np.exp(-out["nll_base"]), atol=1e-6)


def test_kld_kernel_reports_nan() -> None:
    q = np.zeros((2, 16), np.float32)
    b = np.zeros((2, 16), np.float32)
    q[1, 3] = np.nan
    out = native.load().kld_rows(q, b, np.zeros(2, np.int32), 1)
    assert out["kld"][0] == 0 and np.isnan(out["kld"][1]) and np.isnan(out["nll"][1])


def test_statistics_of_known_values() -> None:
    """Median and percentiles by llama-perplexity's interpolation, on values whose answers are known."""
    acc = KldAccumulator()
    n = 101
    acc.add(
        {
            "kld": np.arange(n, dtype=np.float64) / 100,  # 0.00 .. 1.00
            "p_diff": np.zeros(n, np.float32),
            "nll": np.full(n, 2.0, np.float32),
            "nll_base": np.full(n, 1.0, np.float32),
            "same_top": np.arange(n) % 4 != 0,
        }
    )
    s = acc.stats()
    assert s.kld == pytest.approx(0.5) and s.kld_median == pytest.approx(0.5)
    assert s.kld_p90 == pytest.approx(0.9) and s.kld_p99 == pytest.approx(0.99) and s.kld_max == 1.0
    assert s.ln_ppl_ratio == pytest.approx(1.0) and s.ppl == pytest.approx(np.exp(2.0))
    assert s.same_top == pytest.approx(75 / 101)


# llama-perplexity --kl-divergence's summary as its printf formats write it (pinned llama.cpp)
SUMMARY = """====== Perplexity statistics ======
Mean PPL(Q)                   :  25.123456 ±   0.345678
Mean PPL(base)                :  24.987654 ±   0.341234
Cor(ln(PPL(Q)), ln(PPL(base))):  99.12%
Mean ln(PPL(Q)/PPL(base))     :   0.005421 ±   0.001234
Mean PPL(Q)/PPL(base)         :   1.005436 ±   0.001241
Mean PPL(Q)-PPL(base)         :   0.135802 ±   0.031000

====== KL divergence statistics ======
Mean    KLD:   0.012345 ±   0.000456
Maximum KLD:   1.234567
99.9%   KLD:   0.456789
99.0%   KLD:   0.123456
95.0%   KLD:   0.045678
90.0%   KLD:   0.023456
Median  KLD:   0.005678
Minimum KLD:  -0.000001

====== Token probability statistics ======
Mean    Δp: -0.123 ± 0.045 %
Maximum Δp: 45.678%
Median  Δp: -0.001%
RMS Δp    :  3.456 ± 0.123 %
Same top p: 95.432 ± 0.210 %
"""


def test_kld_summaries_read_one_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """kld() is four of kld_stats()'s values as printed (top1 in %, PPL(base) the tool's), and a log
    that lost its last line is run again (llama.cpp issue 22142), for both."""
    runs = iter([SUMMARY.rsplit("Same", 1)[0], SUMMARY] * 2)
    monkeypatch.setattr(llama_tools, "run", lambda cmd: llama_tools.ToolRun(0, next(runs), ""))
    brief = llama_tools.kld(Path("q.gguf"), Path("base.kld"))
    assert brief == {"ppl": 25.123456, "ppl_base": 24.987654, "kld": 0.012345, "top1": 95.432}
    stats = llama_tools.kld_stats(Path("q.gguf"), Path("base.kld"))
    assert stats["ppl"] == 25.123456 and stats["ppl_err"] == 0.345678 and stats["kld_max"] == 1.234567
    assert stats["dp_mean"] == -0.123 * 0.01 and stats["dp_mean_err"] == 0.045 * 0.01
    assert stats["same_top"] == 95.432 * 0.01 and stats["dp_max"] == 45.678 * 0.01
    assert len(stats) == 14 + 7  # every statistic, a "_err" for each of the 7 with a ±
    with pytest.raises(llama_tools.LlamaToolError, match="no 'same_top'"):
        llama_tools.parse_kld_stats(SUMMARY.rsplit("Same", 1)[0])
