"""`ggq convert --method awq / awq+gptq` on Qwen3-MoE (solvers/moe.py): the ffn_norm scale is
shared by every expert and compensated in the float32 router's columns, up -> down scales are per
expert. The fold in full precision keeps the model's logits (against transformers'
Qwen3MoeForCausalLM on the original checkpoint); the written norm and router carry the same
scale; the files run in llama-perplexity and are the same bytes twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import ggml, qwen3
from ggq.checkpoint import Checkpoint
from ggq.gguf import read_gguf
from ggq.solvers import moe
from ggq.solvers.options import SolverOptions
from tests.convert_helpers import layout, solver_gguf
from tests.test_moe_forward import reference
from tests.test_moe_gptq import EXPERTS, decoded, solved_layer0
from tests.test_qwen3_forward import logits


def folded_logits(ckpt: Checkpoint, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """ggq's forward of the model with random scales (0.25 .. 4) folded into every layer's
    ffn_norm / router / experts' gate-up and every expert's up -> down."""
    hp = ckpt.hparams
    g = torch.Generator().manual_seed(seed)
    rope = qwen3.Rope.build(hp, tokens.shape[1])
    h = qwen3.embed(ckpt, tokens)
    for i in range(hp.n_layer):
        w = qwen3.load_layer(ckpt, i)
        w = {k: v.to(torch.float32) for k, v in w.items()}
        moe.fold_norm(w, 4.0 ** (2 * torch.rand(hp.n_embd, generator=g) - 1))
        for e in range(hp.n_expert):
            moe.fold_up(w, e, 4.0 ** (2 * torch.rand(w[moe.UP].shape[1], generator=g) - 1))
        h = qwen3.layer_forward(h, w, hp, rope)
    return logits(ckpt, h)


@pytest.mark.parametrize("variant", ["moe", "moe-4"])
def test_folded_model_gives_transformers_logits_of_the_original(checkpoint, variant: str) -> None:
    ckpt_dir = checkpoint(variant)
    ckpt = Checkpoint(ckpt_dir)
    tokens = torch.randint(0, ckpt.hparams.n_vocab, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = folded_logits(ckpt, tokens, seed=1)
    ref, _ = reference(ckpt_dir, tokens)
    assert (ours - ref).abs().max().item() < 1e-4 * float(ref.max() - ref.min())
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_fold_without_the_router_compensation_changes_the_routing(checkpoint) -> None:
    """The router's columns must carry the scale: without them the layer routes elsewhere."""
    ckpt = Checkpoint(checkpoint("moe-4"))
    hp = ckpt.hparams
    w = qwen3.load_layer(ckpt, 0)
    x = torch.randn(64, hp.n_embd, generator=torch.Generator().manual_seed(2))
    s = 4.0 ** (2 * torch.rand(hp.n_embd, generator=torch.Generator().manual_seed(3)) - 1)
    folded = dict(w)
    moe.fold_norm(folded, s)
    assert torch.equal(qwen3.route(x / s, folded, hp).experts, qwen3.route(x, w, hp).experts)
    folded[moe.ROUTER] = w[moe.ROUTER]
    assert not torch.equal(qwen3.route(x / s, folded, hp).experts, qwen3.route(x, w, hp).experts)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_layer_shares_the_norm_scale_with_the_router_and_decodes(checkpoint, method: str) -> None:
    """Layer 0 solved: the written ffn_norm is the original / s and the written router's columns
    the original's * s for one s (not all ones); every expert slice decodes (ggml's own
    dequantizer) to the solver's weights and was changed; the solver's error of each merged tensor
    is below RTN's."""
    ckpt = Checkpoint(checkpoint("moe-4"))
    hp = ckpt.hparams
    before, after, result, rep, types = solved_layer0(ckpt, "Q4_K_M", SolverOptions(method=method))
    assert rep.alphas["ffn_norm"] != (0.0, 0.0)
    norm = ggml.dequantize(result.tensors["ffn_norm"], types["blk.0.ffn_norm.weight"], hp.n_embd)[0]
    s = before["ffn_norm"].numpy() / norm
    router = result.tensors[qwen3.ROUTER].view(np.float32).reshape(hp.n_expert, hp.n_embd)
    np.testing.assert_allclose(router, before[qwen3.ROUTER].numpy() * s[None, :], rtol=1e-5, atol=1e-7)
    assert not np.allclose(s, 1.0)
    for name in EXPERTS:
        shape = tuple(after[name].shape)
        ours = decoded(result, name, types[f"blk.0.{name}.weight"], shape)
        np.testing.assert_array_equal(ours, after[name].numpy())
        for e in range(hp.n_expert):
            assert not np.allclose(ours[e], before[name][e].numpy()), f"{name} expert {e} unquantized"
        rtn_err, ours_err = rep.errors[name]
        assert ours_err < rtn_err, (name, rep.errors[name])


@pytest.fixture(scope="module")
def moe_awq(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("moe-awq")
    d = checkpoint("moe")
    kw = {"nsamples": 8, "seqlen": 128}
    return {
        "gptq": solver_gguf(d, out / "g.gguf", "Q4_K_M", "gptq", **kw),
        "awq": solver_gguf(d, out / "a.gguf", "Q4_K_M", "awq", **kw),
        "awq-again": solver_gguf(d, out / "a2.gguf", "Q4_K_M", "awq", **kw),
        "awq+gptq": solver_gguf(d, out / "ag.gguf", "Q4_K_M", "awq+gptq", **kw),
    }


def test_awq_moe_files_have_the_layout_and_are_deterministic(moe_awq: dict[str, Path]) -> None:
    assert layout(moe_awq["awq"]) == layout(moe_awq["gptq"]) == layout(moe_awq["awq+gptq"])
    assert moe_awq["awq"].read_bytes() == moe_awq["awq-again"].read_bytes()
    g, a = read_gguf(moe_awq["gptq"]), read_gguf(moe_awq["awq"])
    assert a.metadata["ggq.method"] == "awq"
    for n in ("ffn_norm", qwen3.ROUTER):  # folded: not the checkpoint's any more
        assert not np.array_equal(a.tensor_data(f"blk.0.{n}.weight"), g.tensor_data(f"blk.0.{n}.weight")), n


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_llama_perplexity_runs_the_awq_moe_files(moe_awq: dict[str, Path], prose: Path, method: str) -> None:
    from tests.test_ppl import llama_perplexity

    ppl, err = llama_perplexity(moe_awq[method], prose, 128, 4)
    assert np.isfinite(ppl) and ppl > 1 and err > 0


@pytest.fixture(scope="module")
def moe_imatrix(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MoE fixture's F32 GGUF, llama-imatrix's imatrix of it (4 chunks of 128 of the default
    calibration text) and ggq's --save-imatrix of a gptq Q8_0 convert (4 windows of 128 of it)."""
    import subprocess

    from ggq import calib, native
    from ggq.convert import CalibOptions, ConvertOptions, convert
    from ggq.plan import recipe as rc

    d = tmp_path_factory.mktemp("moe-imatrix")
    ckpt_dir = checkpoint("moe")
    files = {"F32": d / "f32.gguf", "theirs": d / "theirs.gguf", "ours": d / "ours.gguf"}
    convert(Checkpoint(ckpt_dir), files["F32"], ConvertOptions(rc.RecipeOptions("F32")))
    text = d / "calib.txt"  # exactly 4 x 128 tokens: ggq's 4 windows of 128 are llama-imatrix's 4 chunks
    text.write_text(exact_tokens(ckpt_dir / "tokenizer.json", calib.default_text().read_text("utf-8"), 512))
    cmd = [str(native.tool_path("llama-imatrix")), "-m", str(files["F32"]), "-f", str(text)]
    cmd += ["-o", str(files["theirs"]), "-c", "128", "--chunks", "4", "-t", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    cal = CalibOptions(calib=text, nsamples=4, seqlen=128)
    opts = ConvertOptions(rc.RecipeOptions("Q8_0"), method="gptq", cal=cal, save_imatrix=files["ours"])
    convert(Checkpoint(ckpt_dir), d / "q8.gguf", opts)
    return files


def exact_tokens(tokenizer_json: Path, text: str, n: int) -> str:
    """A prefix of ``text`` that tokenizes into exactly ``n`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(text, add_special_tokens=False).ids
    for cut in range(n, n + 32):  # the decoded prefix may re-tokenize to other pieces at its end
        prefix = tok.decode(ids[:cut])
        if len(tok.encode(prefix, add_special_tokens=False).ids) == n:
            return prefix
    raise AssertionError(f"no prefix of exactly {n} tokens")


def test_saved_moe_imatrix_has_per_expert_entries_like_llama_imatrix(moe_imatrix: dict[str, Path]) -> None:
    """Every merged expert tensor has (n_expert, n_in) sums and per-expert counts that add up to
    tokens x n_expert_used, as llama-imatrix's; on the same text (other windows) each expert's
    share of the tokens and its importance vector agree with llama-imatrix's on the same tokens
    (ggq's from the Q8_0 model it writes: layer 1's input, and a few routings, differ a little)."""
    from ggq.imatrix import read_imatrix

    ours, theirs = read_imatrix(moe_imatrix["ours"]), read_imatrix(moe_imatrix["theirs"])
    assert set(ours.sums) == set(theirs.sums)
    exps = sorted(n for n in ours.sums if "_exps" in n)
    assert len(exps) == 3 * 2
    for n in exps:
        assert ours.sums[n].shape == theirs.sums[n].shape, n
        assert ours.counts[n].sum() == 4 * 128 * 2 == theirs.counts[n].sum(), n
        share_o = ours.counts[n] / ours.counts[n].sum()
        share_t = theirs.counts[n] / theirs.counts[n].sum()
        assert np.abs(share_o - share_t).max() < 0.01, (n, share_o, share_t)
        for e in range(ours.sums[n].shape[0]):
            a = ours.sums[n][e] / ours.counts[n][e]
            b = theirs.sums[n][e] / theirs.counts[n][e]
            assert np.corrcoef(a, b)[0, 1] > 0.99, (n, e)
            assert 0.95 < a.mean() / b.mean() < 1.05, (n, e, a.mean(), b.mean())


def test_llama_quantize_takes_the_saved_moe_imatrix(moe_imatrix: dict[str, Path], tmp_path: Path) -> None:
    import subprocess

    from ggq import native

    (tmp_path / "imatrix.gguf").write_bytes(moe_imatrix["ours"].read_bytes())
    cmd = [str(native.tool_path("llama-quantize")), "--imatrix", "imatrix.gguf"]
    cmd += [str(moe_imatrix["F32"]), str(tmp_path / "q.gguf"), "Q4_K_M", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    out = read_gguf(tmp_path / "q.gguf")
    n_linears = len([n for n in read_imatrix_names(moe_imatrix["ours"])])
    assert out.metadata["quantize.imatrix.entries_count"] == n_linears
    assert n_linears == 2 * (4 + 1 + 3)  # q k v o, the router, gate/up/down_exps per layer


def read_imatrix_names(path: Path) -> list[str]:
    from ggq.imatrix import read_imatrix

    return sorted(read_imatrix(path).sums)
