"""tools/train_reference.py on Qwen3-MoE (the script that trained models/qwen3-moe-micro): the
router's load-balancing loss is in the step's gradient, a run resumed from a checkpoint writes
the same bytes as one never stopped, and the result is a checkpoint ggq reads and converts."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from ggq.checkpoint import Checkpoint
from ggq.files import sha256_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import train_reference as tr  # noqa: E402

SHAPE = tr.Shape(
    arch="qwen3_moe", layers=1, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=128,
    experts=4, experts_per_tok=2, moe_intermediate=64,
)  # fmt: skip
TINY = [
    "--arch", "qwen3_moe", "--layers", "1", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
    "--head-dim", "32", "--intermediate", "128", "--experts", "4", "--experts-per-tok", "2",
    "--moe-intermediate", "64", "--steps", "4", "--batch", "2", "--seq", "32", "--warmup", "1",
    "--threads", "1", "--log-every", "1",
]  # fmt: skip


def one_step(coef: float) -> tuple[torch.nn.Module, dict[str, float]]:
    torch.manual_seed(0)
    shape = dataclasses.replace(SHAPE, router_aux_coef=coef)
    model = tr.build_model(shape, seed=0)
    sch = tr.Schedule(steps=4, batch=2, seq=16, warmup=1)
    batch = torch.randint(0, 16384, (2, 17), generator=torch.Generator().manual_seed(1))
    return model, tr.train_step(model, tr.make_optimizer(model, sch), batch, sch, 0)


def test_load_balancing_loss_is_in_the_gradient() -> None:
    """The same step with coefficient 0 and 1: the language-model loss (before the step) is the
    same, the aux loss is reported (about top_k = 2 at a balanced start), the routers move differently."""
    m0, s0 = one_step(0.0)
    m1, s1 = one_step(1.0)
    assert s0["loss"] == s1["loss"] and 1.5 < s1["aux_loss"] < 4.0
    r0, r1 = (m.model.layers[0].mlp.gate.weight for m in (m0, m1))
    assert not torch.equal(r0, r1)
    # the experts' weights move too, but an embedding row no token used (no gradient) does not
    e0, e1 = (m.model.embed_tokens.weight for m in (m0, m1))
    assert not torch.equal(e0, e1)


def test_moe_resumed_training_writes_the_same_bytes_and_ggq_reads_it(
    tmp_path: Path, small_text: Path
) -> None:
    common = [*TINY, "--text", str(small_text)]
    assert tr.main([*common, "--ckpt-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "a")]) == 0
    c2 = ["--ckpt-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "b")]
    assert tr.main([*common, *c2, "--stop-after", "2"]) == 0
    assert tr.main([*common, *c2, "--resume"]) == 0
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(
        tmp_path / "b" / "model.safetensors"
    )
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["norm_topk_prob"] is True
    ckpt = Checkpoint(tmp_path / "a")
    assert (ckpt.hparams.n_expert, ckpt.hparams.n_expert_used, ckpt.hparams.n_ff_exp) == (4, 2, 64)
    assert ckpt.load("blk.0.ffn_down_exps.weight").shape == (4, 64, 64)


def test_per_layer_balance_is_each_layers_own_loss() -> None:
    """Two layers, one routing evenly and one sending every token to the same experts: the pooled
    loss averages the counts first, the per-layer one is the mean of the two layers' own losses,
    and only the skewed layer is above top_k (2)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    even = torch.zeros(64, 4)
    skewed = torch.tensor([[4.0, 3.0, -4.0, -4.0]]).repeat(64, 1)
    own = [float(load_balancing_loss_func((r,), 4, 2)) for r in (even, skewed)]
    assert abs(own[0] - 2.0) < 1e-5 and own[1] > 3.0
    got = float(tr.per_layer_balance((even, skewed), 4, 2))
    assert abs(got - sum(own) / 2) < 1e-6
    pooled = float(load_balancing_loss_func((even, skewed), 4, 2))
    assert abs(pooled - got) > 0.1


def test_init_warm_starts_from_a_model_folder(tmp_path: Path, small_text: Path) -> None:
    """--init loads every weight of a folder this script wrote (0 steps later the export equals
    it); a folder of another shape is refused naming the tensor; --resume needs the same --init."""
    common = [*TINY, "--text", str(small_text)]
    assert tr.main([*common, "--ckpt-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "a")]) == 0
    model = tr.build_model(SHAPE, seed=5)
    tr.init_from(model, tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    for name, p in model.state_dict().items():
        if name in saved:
            assert torch.equal(p, saved[name].float()), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    wide = [*common, "--hidden", "128", "--init", str(tmp_path / "a")]
    assert tr.main([*wide, "--ckpt-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "b")]) == 2
    warm = [*common, "--init", str(tmp_path / "a"), "--balance", "per-layer"]
    c3 = ["--ckpt-dir", str(tmp_path / "c3"), "--out", str(tmp_path / "c")]
    assert tr.main([*warm, *c3, "--stop-after", "2"]) == 0
    assert tr.main([*common, "--balance", "per-layer", *c3, "--resume"]) == 2  # without --init
    assert tr.main([*warm, *c3, "--resume"]) == 0
