"""Train a small reference Qwen3 from scratch, on CPU, into the Hugging Face layout of models/qwen3-micro.

Reference models give the solvers learned weights to be measured on (random weights say little
about quantization quality). The model is transformers' own ``Qwen3ForCausalLM`` built from a
config; the text is tokenized with an existing ``tokenizer.json`` (qwen3-micro's 16,384 tokens by
default); training is fp32 AdamW with a linear warm-up and a cosine decay to ``--min-lr-frac`` of
the peak. Batches are windows of ``--seq + 1`` tokens at offsets drawn from a generator seeded by
``(seed, step)``, so a run resumed from a checkpoint (``--resume``) sees the same batches as one
that was never stopped. The result is bf16 ``model.safetensors`` + ``config.json`` (written by
transformers' ``save_pretrained``) and the tokenizer / chat template / generation files copied
from the tokenizer's folder.

    nice -n 10 .venv/bin/python tools/train_reference.py --out models/qwen3-micro-b \\
        --layers 4 --hidden 512 --heads 4 --kv-heads 2 --head-dim 128 --intermediate 1024 \\
        --steps 800 --seed 1 --ckpt-dir /tmp/c/ckpt [--resume]

``--measure N`` runs N steps from a fresh model, prints the step time and writes nothing;
``--stop-after N`` checkpoints at step N and exits (a run in slices, each one ``--resume``).

Architectures are rows of ``ARCHS`` (config class, model class, which shape fields they take);
the Qwen3-MoE row takes the expert fields (``--experts``, ``--experts-per-tok``,
``--moe-intermediate``, ``--router-aux-coef``); the training step adds ``coef * aux_loss`` (the
router's load-balancing loss, returned by transformers when ``output_router_logits`` is set) to
the language-model loss (tests/test_moe_train.py checks it reaches the gradient). It trained
models/qwen3-moe-micro (its README has the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ggq.errors import GGQError  # noqa: E402
from ggq.files import atomic_write, sha256_file  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "train" / "books-and-addresses.txt"
TOKENIZER_DIR = ROOT / "models" / "qwen3-micro"
# copied verbatim from the tokenizer's folder: the new model shares its vocabulary and ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


class TrainError(GGQError, ValueError):
    """A bad option, file or checkpoint; the message names it."""


@dataclass(frozen=True)
class Arch:
    config_class: str  # in transformers
    model_class: str
    model_type: str
    moe: bool  # takes the expert fields of Shape and returns a router loss
    trainable: bool  # run and checked end to end by this script


ARCHS = {
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", "qwen3", moe=False, trainable=True),
    "qwen3_moe": Arch("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3_moe", moe=True, trainable=True),
}


@dataclass(frozen=True)
class Shape:
    arch: str = "qwen3"
    layers: int = 4
    hidden: int = 512
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 128
    intermediate: int = 1024
    vocab: int = 16384
    tied: bool = True
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    max_positions: int = 4096
    bos_id: int = 16358  # <|endoftext|>, as in qwen3-micro
    eos_id: int = 16360  # <|im_end|>
    # Qwen3-MoE only
    experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    router_aux_coef: float = 0.001


@dataclass(frozen=True)
class Schedule:
    steps: int = 800
    batch: int = 16
    seq: int = 256
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    warmup: int = 50
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1
    # MoE: "pooled" = transformers' load-balancing loss over the routings of all layers at once
    # (one layer's experts may starve while the pooled counts look even); "per-layer" = the mean
    # of that loss taken over each layer's routings alone
    balance: str = "pooled"


def check_shape(s: Shape) -> None:
    if s.arch not in ARCHS:
        raise TrainError(f"--arch {s.arch}: expected one of {', '.join(ARCHS)}")
    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        if getattr(s, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} {getattr(s, name)}: must be positive")
    if s.heads % s.kv_heads:
        raise TrainError(f"--heads {s.heads} is not a multiple of --kv-heads {s.kv_heads}")
    if ARCHS[s.arch].moe:
        if s.experts <= 0 or s.experts_per_tok <= 0 or s.moe_intermediate <= 0:
            raise TrainError(f"--arch {s.arch} needs --experts, --experts-per-tok and --moe-intermediate")
        if s.experts_per_tok > s.experts:
            raise TrainError(f"--experts-per-tok {s.experts_per_tok} > --experts {s.experts}")
    elif s.experts or s.experts_per_tok or s.moe_intermediate:
        raise TrainError(
            f"--experts/--experts-per-tok/--moe-intermediate are for an MoE --arch, not {s.arch}"
        )


def hf_config(s: Shape) -> Any:
    """transformers' config object for the shape (transformers 5: ``rope_parameters``)."""
    import transformers

    arch = ARCHS[s.arch]
    kw: dict[str, Any] = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        hidden_act="silu",
        max_position_embeddings=s.max_positions,
        rms_norm_eps=s.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        tie_word_embeddings=s.tied,
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=s.bos_id,
        eos_token_id=s.eos_id,
        architectures=[arch.model_class],
    )
    if arch.moe:
        kw.update(
            num_experts=s.experts,
            num_experts_per_tok=s.experts_per_tok,
            moe_intermediate_size=s.moe_intermediate,
            router_aux_loss_coef=s.router_aux_coef,
            output_router_logits=True,  # the model then adds coef * load-balancing loss to its loss
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    return getattr(transformers, arch.config_class)(**kw)


def build_model(s: Shape, seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[s.arch].model_class)(hf_config(s))
    return model.float().train()


def tokens(text: Path, tokenizer_json: Path, cache_dir: Path) -> np.ndarray:
    """The whole text as token ids (int32), cached in ``cache_dir`` by the two files' hashes."""
    for p in (text, tokenizer_json):
        if not p.is_file():
            raise TrainError(f"{p}: no such file")
    key = hashlib.sha256((sha256_file(text) + sha256_file(tokenizer_json)).encode()).hexdigest()[:16]
    cached = cache_dir / f"tokens-{key}.npy"
    if cached.is_file():
        return np.load(cached)
    from tokenizers import Tokenizer

    ids = (
        Tokenizer.from_file(str(tokenizer_json))
        .encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
        .ids
    )
    arr = np.asarray(ids, dtype=np.int32)
    with atomic_write(cached, suffix=".tmp.npy") as tmp:
        np.save(tmp, arr)
    return arr


def batch_at(ids: torch.Tensor, sch: Schedule, step: int) -> torch.Tensor:
    """(batch, seq + 1) windows of the text; offsets depend only on (seed, step)."""
    g = torch.Generator().manual_seed(sch.seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - sch.seq - 1, (sch.batch,), generator=g)  # (B,)
    return torch.stack([ids[i : i + sch.seq + 1] for i in starts.tolist()]).long()  # (B, T+1)


def lr_at(sch: Schedule, step: int) -> float:
    if step < sch.warmup:
        return sch.lr * (step + 1) / sch.warmup
    t = (step - sch.warmup) / max(1, sch.steps - sch.warmup)  # 0 -> 1
    return sch.lr * (sch.min_lr_frac + (1 - sch.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, sch: Schedule) -> torch.optim.AdamW:
    # no weight decay on norms (1-d); the embedding (also the tied output) is decayed like a matrix
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": sch.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=sch.lr, betas=(sch.beta1, sch.beta2), eps=1e-8)


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, sch: Schedule, step: int
) -> dict[str, float]:
    for g in opt.param_groups:
        g["lr"] = lr_at(sch, step)
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T): position t predicts token t + 1
    out = model(input_ids=x, use_cache=False)
    lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())  # (B*T, V) vs (B*T,)
    loss = lm
    aux = getattr(out, "aux_loss", None)  # MoE with output_router_logits: the load-balancing loss
    if aux is not None:
        config: Any = model.config
        if sch.balance == "per-layer":
            aux = per_layer_balance(out.router_logits, config.num_experts, config.num_experts_per_tok)
        loss = lm + config.router_aux_loss_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sch.grad_clip)
    opt.step()
    stats = {"loss": lm.item(), "grad_norm": norm.item()}
    if aux is not None:
        stats["aux_loss"] = aux.item()
    return stats


def per_layer_balance(router_logits: tuple[torch.Tensor, ...], n_expert: int, top_k: int) -> torch.Tensor:
    """Mean over the layers of transformers' load-balancing loss of each layer's (tokens,
    n_expert) router logits alone: top_k when that layer's routings are even."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    losses = [load_balancing_loss_func((r,), n_expert, top_k) for r in router_logits]
    return torch.stack([torch.as_tensor(v) for v in losses]).mean()


def init_from(model: torch.nn.Module, folder: Path) -> str:
    """Start from the weights of a model folder this script wrote (a warm start: new optimizer
    and schedule), read by transformers (which fuses the hub's per-expert tensors as the model
    holds them). Every parameter must be there with its shape; returns the file's sha256."""
    import transformers

    path = folder / "model.safetensors"
    if not path.is_file():
        raise TrainError(f"--init {folder}: no model.safetensors")
    src = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    own = model.state_dict()
    for name, p in own.items():
        if name not in src:
            raise TrainError(f"--init {path}: no tensor {name}")
        if tuple(src[name].shape) != tuple(p.shape):
            raise TrainError(
                f"--init {path}: {name} is {tuple(src[name].shape)}, this shape needs {tuple(p.shape)}"
            )
    model.load_state_dict({k: src[k] for k in own})
    return sha256_file(path)


def save_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, meta: dict[str, Any]
) -> None:
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "meta": meta}
    with atomic_write(path, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """The step to go on from and the run's history. Everything must match this run except
    ``--steps``: a run that turns out slower than planned may be given a shorter schedule (the
    cosine then continues from the resumed step on the new length; the history records it)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    old = state["meta"]
    for key in ("shape", "tokens", "init"):
        if old.get(key) != meta.get(key):
            raise TrainError(f"{path}: made with {key} {old.get(key)}, not this run's {meta.get(key)}")
    mine = {k: v for k, v in meta["schedule"].items() if k != "steps"}
    theirs = {k: v for k, v in old["schedule"].items() if k != "steps"}
    if mine != theirs:
        raise TrainError(f"{path}: made with schedule {old['schedule']}, not this run's {meta['schedule']}")
    step = int(state["step"])
    if step > meta["schedule"]["steps"]:
        raise TrainError(f"--steps {meta['schedule']['steps']}: {path} is already at step {step}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    history = list(old.get("history", [{"from_step": 0, "steps": old["schedule"]["steps"]}]))
    if history[-1]["steps"] != meta["schedule"]["steps"]:
        history.append({"from_step": step, "steps": meta["schedule"]["steps"]})
    return step, history


def export(model: torch.nn.Module, out: Path, tokenizer_dir: Path) -> None:
    """bf16 weights and config by save_pretrained, tokenizer files copied; each file lands whole."""
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf: Any = model.to(torch.bfloat16)  # a transformers PreTrainedModel
        hf.save_pretrained(staging, safe_serialization=True)
        (staging / "generation_config.json").unlink(missing_ok=True)  # the tokenizer folder's is used
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, staging / name)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(staging.iterdir()):
            f.chmod(0o644)  # save_pretrained's temporary files are private
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d, e = Shape(), Schedule()
    ap.add_argument("--out", type=Path, help="model folder to write (required unless --measure)")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/train_reference"))
    ap.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/last.pt")
    ap.add_argument("--init", type=Path, help="start from this model folder's weights (warm start)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--measure", type=int, default=0, help="time N steps, write nothing")
    ap.add_argument(
        "--stop-after", type=int, default=0, help="checkpoint at step N and exit (go on with --resume)"
    )
    for f in dataclasses.fields(Shape):
        if f.name == "tied":
            ap.add_argument("--untied", action="store_true", help="separate output matrix")
        else:
            ap.add_argument(
                "--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name)
            )
    for f in dataclasses.fields(Schedule):
        ap.add_argument(
            "--" + f.name.replace("_", "-"), type=type(getattr(e, f.name)), default=getattr(e, f.name)
        )
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> None:
    shape = Shape(
        **{f.name: getattr(a, f.name) for f in dataclasses.fields(Shape) if f.name != "tied"},
        tied=not a.untied,
    )
    sch = Schedule(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Schedule)})
    check_shape(shape)
    if not ARCHS[shape.arch].trainable:
        raise TrainError(f"--arch {shape.arch}: its training has not been run and checked yet")
    if a.out is None and not a.measure:
        raise TrainError("--out is required")
    if sch.steps <= 0 or sch.batch <= 0 or sch.seq <= 0:
        raise TrainError("--steps, --batch and --seq must be positive")
    if sch.balance not in ("pooled", "per-layer"):
        raise TrainError(f"--balance {sch.balance}: expected pooled or per-layer")
    torch.set_num_threads(a.threads)
    a.ckpt_dir.mkdir(parents=True, exist_ok=True)
    tok_json = a.tokenizer_dir / "tokenizer.json"
    ids_np = tokens(a.text, tok_json, a.ckpt_dir)
    if int(ids_np.max()) >= shape.vocab:
        raise TrainError(f"{tok_json}: token id {int(ids_np.max())} >= --vocab {shape.vocab}")
    ids = torch.from_numpy(ids_np)
    meta = {
        "shape": dataclasses.asdict(shape),
        "schedule": dataclasses.asdict(sch),
        "tokens": {"text": str(a.text), "n": len(ids_np), "sha256_tokenizer": sha256_file(tok_json)},
        "history": [{"from_step": 0, "steps": sch.steps}],
    }
    model = build_model(shape, sch.seed)
    if a.init is not None:
        meta["init"] = {"folder": str(a.init), "sha256": init_from(model, a.init)}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{shape.arch}: {n_params:,} parameters; text {len(ids_np):,} tokens; {sch.steps} steps x {sch.batch} x {sch.seq}",
        flush=True,
    )
    opt = make_optimizer(model, sch)
    last = a.ckpt_dir / "last.pt"
    step = 0
    if a.resume:
        if not last.is_file():
            raise TrainError(f"--resume: no checkpoint {last}")
        step, meta["history"] = load_checkpoint(last, model, opt, meta)
        print(f"resumed at step {step} from {last}; schedule history {meta['history']}", flush=True)
    end = min(sch.steps, step + a.measure) if a.measure else sch.steps
    if a.stop_after:
        end = min(end, a.stop_after)
    t0, window, times = time.time(), [], []
    while step < end:
        ts = time.time()
        stats = train_step(model, opt, batch_at(ids, sch, step), sch, step)
        times.append(time.time() - ts)
        window.append(stats["loss"])
        step += 1
        if step % a.log_every == 0 or step == end or a.measure:
            tps = sch.batch * sch.seq * len(times) / sum(times)
            extra = f" aux {stats['aux_loss']:.4f}" if "aux_loss" in stats else ""
            print(
                f"step {step}/{sch.steps} loss {sum(window) / len(window):.4f}{extra} lr {lr_at(sch, step - 1):.2e} "
                f"|g| {stats['grad_norm']:.2f} {tps:.0f} tok/s {sum(times) / len(times):.2f} s/step elapsed {time.time() - t0:.0f} s at {time.strftime('%H:%M:%S', time.gmtime())} UTC",
                flush=True,
            )
            window, times = [], []
        if not a.measure and (step % a.ckpt_every == 0 or step == end):
            save_checkpoint(last, model, opt, step, meta)
    if a.measure or step < sch.steps:
        return
    export(model, a.out, a.tokenizer_dir)
    print(f"wrote {a.out} (model.safetensors sha256 {sha256_file(a.out / 'model.safetensors')})", flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse(argv))
    except TrainError as err:
        print(f"train_reference: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
