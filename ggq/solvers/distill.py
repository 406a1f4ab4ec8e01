"""Quantization-aware distillation into the exact ggml blocks (``ggq convert --distill STEPS``).

A calibration solver (gptq, awq, awq+gptq) chooses each block's scales and codes layer by layer,
each layer judged by its own output. Distillation then trains the whole quantized model against
the full-precision one, end to end, on the KL divergence of their next-token distributions, with
the file's block structure fixed: the same tensor types, the same block scales, only the codes
(and the F32 norms) move.

What is trained, per quantized linear: a latent code index ``u`` per weight (code c at u = c).
The forward reads the exact value ggml decodes for the nearest code (``levels``, read from the
solver's own bytes by the type's ``CodeGrid``); the backward passes the gradient through the
rounding (straight-through), scaled by the sub-block's mean distance between neighbouring codes.
Adam's steps on ``u`` are therefore in codes whatever the tensor's magnitude, so one learning
rate serves every tensor, type and model.
``u`` starts on the solver's codes: step 0 is the solver's file, bit for bit.

The teacher's logits are computed batch by batch (no cache on disk); a slice of the calibration
windows is held out, its mean KLD measured every ``eval_every`` steps, and the best state (lowest
held-out KLD, step 0 included) is what gets written: the distillation never makes the file worse
on text it did not train on. The written bytes are the type's ``pack`` of the final codes under
the solver's scales; ggml's dequantization of them equals the weights the distillation ended with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ggq import ggml, qwen3
from ggq.checkpoint import Checkpoint, HParams
from ggq.ggml.floats import fp16_bytes, fp16_field
from ggq.solvers.options import (
    HEAD,
    BlockReport,
    DistillError,
    DistillOptions,
    DistillReport,
    StepReport,
    check_distill,
)
from ggq.solvers.reductions import total

TRAINED_NORMS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm")
# types whose block is an fp16 d at byte 0 and codes decoding to d * unit[code]: one float32 product
# of an fp16 and an integer of at most 8 bits, exact, so a trained d (rounded to fp16) decodes in
# ggml to exactly what the student used. Their d is trained with the codes; other types keep
# the solver's scales.
SCALED_TYPES = ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL")


class CodedTensor:
    """One quantized tensor whose codes are trained under fixed block scales."""

    def __init__(self, data: np.ndarray, type_name: str, cols: int, device: str = "cpu") -> None:
        fmt = ggml.FORMATS.get(type_name)
        if fmt is None or fmt.grid is None:
            raise DistillError(f"--distill cannot train {type_name} blocks (no code grid)")
        self.type, self.grid, bs = type_name, fmt.grid, fmt.block_size
        raw = np.ascontiguousarray(data, dtype=np.uint8)
        rows = raw.shape[0]
        self.nb = cols // bs
        self.raw = raw.reshape(rows, self.nb, fmt.type_size)
        levels = np.stack(
            [self.grid.levels(self.raw[:, b]) for b in range(self.nb)]
        )  # (nb, n_sub, rows, n_codes)
        levels = levels.transpose(2, 0, 1, 3).reshape(rows, -1, levels.shape[-1])  # (rows, S, n_codes)
        unit = torch.from_numpy(np.asarray(self.grid.unit, dtype=np.float32))
        self.sub, self.shape = self.grid.sub, (rows, cols)
        self.levels = torch.from_numpy(np.ascontiguousarray(levels, dtype=np.float32)).to(device)
        self.unit = unit.to(device)
        self.mids = ((unit[1:] + unit[:-1]) / 2).to(device)
        span = float(unit[-1] - unit[0])
        self.step = ((self.levels[..., -1] - self.levels[..., 0]) / span).unsqueeze(-1)  # (rows, S, 1)
        self.n_codes = len(unit)
        # the straight-through slope: the mean distance of neighbouring codes (one for the uniform
        # types' integer grids; IQ4_NL's non-uniform table has its mean spacing)
        self.slope = self.step * (span / (self.n_codes - 1))
        w0 = torch.from_numpy(ggml.dequantize(raw, type_name, cols)).to(device)
        codes0 = self._nearest(w0)
        self.u = torch.nn.Parameter(
            codes0.to(torch.float32)
        )  # (rows, cols): the code index, on the solver's codes
        if not torch.equal(self._decode(codes0), w0):
            raise DistillError(f"{type_name}: the code grid does not reproduce the solver's weights")
        self.c0 = codes0.to(torch.float32)
        self.log_scale: torch.nn.Parameter | None = None
        if type_name in SCALED_TYPES:
            d0 = np.stack([fp16_field(self.raw[:, b], 0) for b in range(self.nb)], axis=1)  # (rows, nb)
            self.d0 = torch.from_numpy(d0).to(device)
            if not torch.equal(self.d0.unsqueeze(-1) * self.unit, self.levels):
                raise DistillError(f"{type_name}: the levels are not d * unit")
            self.log_scale = torch.nn.Parameter(torch.zeros_like(self.d0))  # d = d0 * exp(log_scale)

    def scales(self) -> torch.Tensor:
        """(rows, nb) the trained d, rounded to fp16 (straight-through: the gradient of the
        unrounded d)."""
        assert self.log_scale is not None
        d = self.d0 * torch.exp(self.log_scale)
        return d + (d.to(torch.float16).to(torch.float32) - d).detach()

    def _levels(self) -> torch.Tensor:
        if self.log_scale is None:
            return self.levels
        return self.scales().unsqueeze(-1) * self.unit  # (rows, nb, n_codes): sub-block = block

    def _nearest(self, w: torch.Tensor) -> torch.Tensor:
        """The code of each weight (exact levels: the nearest in the grid's own coordinate)."""
        rows, cols = self.shape
        lv = self.levels
        origin = lv[..., :1] - self.step * self.unit[0]  # (rows, S, 1): where unit 0 would sit
        safe = torch.where(self.step == 0, torch.ones_like(self.step), self.step)
        pos = (w.reshape(rows, -1, self.sub) - origin) / safe  # (rows, S, sub) in grid units
        return torch.bucketize(pos, self.mids).reshape(rows, cols)

    def codes(self) -> torch.Tensor:
        """(rows, cols) int64: the code index nearest each latent coordinate."""
        return torch.round(self.u.detach()).clamp_(0, self.n_codes - 1).to(torch.int64)

    def _decode(self, codes: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self.shape
        idx = codes.reshape(rows, -1, self.sub)
        return torch.gather(self.levels if levels is None else levels, 2, idx).reshape(rows, cols)

    def weight(self) -> torch.Tensor:
        """The exact decoded weights of the current codes, with straight-through gradients to u."""
        rows, cols = self.shape
        exact = self._decode(self.codes(), self._levels())
        slope = self.slope.expand(rows, -1, self.sub).reshape(rows, cols)
        return exact + slope * (self.u - self.u.detach())

    def to_bytes(self) -> np.ndarray:
        """(rows, row_bytes) uint8: the blocks with the trained codes under the solver's scales."""
        codes = self.codes().cpu().numpy().astype(np.uint8)
        bs = codes.shape[1] // self.nb
        raw = self.raw
        if self.log_scale is not None:  # the trained d into each block's fp16 field
            raw = raw.copy()
            d = self.scales().detach().cpu().numpy()
            for b in range(self.nb):
                raw[:, b, 0:2] = fp16_bytes(d[:, b])
        parts = [self.grid.pack(raw[:, b], codes[:, b * bs : (b + 1) * bs]) for b in range(self.nb)]
        return np.ascontiguousarray(np.concatenate(parts, axis=1))


def _floats(data: np.ndarray, type_name: str, cols: int, device: str) -> torch.Tensor:
    return torch.from_numpy(ggml.dequantize(data, type_name, cols)).to(device)


class _Model:
    """A Qwen3's ends (embedding, final norm, output); the layers' weight dicts come per call:
    the teacher's are fixed, the student's rebuilt from the trained codes at every step."""

    def __init__(self, hp: HParams, embed: torch.Tensor, norm: torch.Tensor, output: torch.Tensor) -> None:
        self.hp, self.embed, self.norm, self.output = hp, embed, norm, output

    def logits(
        self, tokens: torch.Tensor, rope: qwen3.Rope, layers: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        h = self.embed[tokens]  # (B, T, n_embd)
        for w in layers:
            h = qwen3.layer_forward(h, w, self.hp, rope)
        return qwen3.rms_norm(h, self.norm, self.hp.rms_eps) @ self.output.T  # (B, T, n_vocab)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    t = torch.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float(), dim=-1)
    s = torch.log_softmax(student.reshape(-1, student.shape[-1]).float(), dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


class _CodeSteps:
    """Momentum steps on the code indices, each tensor's step divided by its momentum's RMS: the
    average index moves ``lr`` per step and an index whose gradient is k times the tensor's
    typical one moves k times as far (at most ``clip`` times: gradients are heavy-tailed), so the
    codes with the clearest case flip first. Measured on qwen3-micro Q4_0 (gptq, 64 x 256): Adam
    at 0.05 flipped too many codes at once (held-out KLD 0.00248 -> 0.00372 by step 15), and this
    step unclipped at 0.05 moved outliers by several codes a step (0.0273 at step 5)."""

    def __init__(self, params: list[torch.nn.Parameter], beta: float = 0.9, clip: float = 4.0) -> None:
        self.params, self.beta, self.clip = params, beta, clip
        self.momentum = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for p, m in zip(self.params, self.momentum, strict=True):
            if p.grad is None:
                continue
            m.mul_(self.beta).add_(p.grad, alpha=1 - self.beta)
            rms = math.sqrt(total(m * m) / m.numel())  # numpy's sum: the same at any thread count
            if rms > 0:
                p.sub_((m / rms).clamp_(-self.clip, self.clip), alpha=lr)


def _held_out(n: int, opts: DistillOptions) -> int:
    """Calibration windows held out (the last ones) for both phases' early stopping."""
    hold = opts.holdout or max(1, n // 8)
    if hold >= n:
        raise DistillError(f"--distill: {hold} held-out windows leave none of {n} to train on")
    return hold


class Distiller:
    """The student built from the solver's bytes, trained against the checkpoint."""

    def __init__(
        self,
        ckpt: Checkpoint,
        types: dict[str, str],
        solved: dict[str, np.ndarray],
        device: str = "cpu",
    ) -> None:
        hp = ckpt.hparams
        self.ckpt, self.types, self.device, self.hp = ckpt, types, device, hp
        self.coded: dict[str, CodedTensor] = {}
        self.norms: dict[str, torch.nn.Parameter] = {}
        self.fixed: dict[str, torch.Tensor] = {}  # float linears, decoded once: nothing trains them
        t_layers: list[dict[str, torch.Tensor]] = []
        for i in range(hp.n_layer):
            t_layers.append(qwen3.load_layer(ckpt, i, device))
            for lin in qwen3.LINEARS:
                name = f"blk.{i}.{lin}.weight"
                cols = t_layers[i][lin].shape[1]
                data = solved[name]  # the solver writes every linear of every layer
                if ggml.is_float(types[name]):
                    self.fixed[name] = _floats(data, types[name], cols, device)
                else:
                    self.coded[name] = CodedTensor(data, types[name], cols, device)
            for nm in TRAINED_NORMS:
                name = f"blk.{i}.{nm}.weight"
                start = solved[name].view(np.float32).reshape(-1) if name in solved else ckpt.load(name)
                self.norms[name] = torch.nn.Parameter(
                    torch.from_numpy(np.array(start, np.float32)).to(device)
                )
        self.extra = {k: v for k, v in solved.items() if k not in self.coded and k not in self.norms}
        embed_f = torch.from_numpy(ckpt.load("token_embd.weight")).to(device)
        norm = torch.from_numpy(ckpt.load("output_norm.weight")).to(device)
        tied = "output.weight" not in types
        out_f = embed_f if tied else torch.from_numpy(ckpt.load("output.weight")).to(device)
        self.teacher, self.teacher_layers = _Model(hp, embed_f, norm, out_f), t_layers
        embed_q = self._head("token_embd.weight", embed_f, solved)
        out_q = embed_q if tied else self._head("output.weight", out_f, solved)
        self.student = _Model(hp, embed_q, norm, out_q)

    def _head(self, name: str, values: torch.Tensor, solved: dict[str, np.ndarray]) -> torch.Tensor:
        """The tensor as it is written, decoded: the solver's (solvers/head.py) or the writer's
        plain RTN."""
        t = self.types[name]
        data = solved[name] if name in solved else ggml.quantize(values.cpu().numpy(), t)
        return _floats(data, t, values.shape[1], self.device)

    def student_layers(self) -> list[dict[str, torch.Tensor]]:
        return [self._layer(i) for i in range(self.hp.n_layer)]

    def _params(self) -> dict[str, torch.nn.Parameter]:
        out = {k: c.u for k, c in self.coded.items()}
        out.update({f"{k}#scale": c.log_scale for k, c in self.coded.items() if c.log_scale is not None})
        out.update(self.norms)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self._params().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._params().items():
                p.copy_(state[k])

    def kld(self, tokens: torch.Tensor, rope: qwen3.Rope, batch: int) -> float:
        """Mean KLD of the student on ``tokens`` (N, T), ``batch`` windows at a time."""
        total, n = 0.0, 0
        with torch.no_grad():
            layers = self.student_layers()
            for i in range(0, tokens.shape[0], batch):
                b = tokens[i : i + batch]
                t = self.teacher.logits(b, rope, self.teacher_layers)
                s = self.student.logits(b, rope, layers)
                total += float(_kl(t, s)) * b.numel()
                n += b.numel()
        return total / n

    def train(
        self, tokens: np.ndarray, opts: DistillOptions, report: Callable[[StepReport], None] | None = None
    ) -> float:
        """Train on the calibration windows ``tokens`` (N, T); returns the best held-out KLD."""
        check_distill(opts, tokens.shape[0])
        n = tokens.shape[0]
        hold = _held_out(n, opts)
        all_t = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        train_t, held_t = all_t[: n - hold], all_t[n - hold :]
        rope = qwen3.Rope.build(self.hp, tokens.shape[1], self.device)
        codes = _CodeSteps([c.u for c in self.coded.values()])
        norms = torch.optim.Adam(list(self.norms.values()), lr=opts.norm_lr, betas=(0.9, 0.99))
        rng = np.random.default_rng(opts.seed)
        scales = [c.log_scale for c in self.coded.values() if c.log_scale is not None]
        for ls in scales:  # block scales are the block phase's: no backward work for them here
            ls.requires_grad_(False)
        try:
            return self._train_end_to_end(train_t, held_t, rope, codes, norms, rng, opts, report)
        finally:
            for ls in scales:
                ls.requires_grad_(True)

    def _train_end_to_end(
        self,
        train_t: torch.Tensor,
        held_t: torch.Tensor,
        rope: qwen3.Rope,
        codes: _CodeSteps,
        norms: torch.optim.Adam,
        rng: np.random.Generator,
        opts: DistillOptions,
        report: Callable[[StepReport], None] | None,
    ) -> float:
        best = self.kld(held_t, rope, opts.batch)
        best_state, best_step, since = self.state(), 0, 0
        if report:
            report(StepReport(0, float("nan"), best, 0, 0.0))
        order: list[int] = []
        for step in range(1, opts.steps + 1):
            start = time.perf_counter()
            if len(order) < opts.batch:
                order += list(rng.permutation(train_t.shape[0]))
            idx, order = order[: opts.batch], order[opts.batch :]
            b = train_t[torch.tensor(idx, device=self.device)]
            frac = 1 - (step - 1) / opts.steps  # linear decay to 0
            norms.param_groups[0]["lr"] = opts.norm_lr * frac
            with torch.no_grad():
                t = self.teacher.logits(b, rope, self.teacher_layers)
            loss = _kl(t, self.student.logits(b, rope, self.student_layers()))
            if not torch.isfinite(loss):
                self.load_state(best_state)
                raise DistillError(f"--distill: the loss is {float(loss)} at step {step}; stopped")
            norms.zero_grad(set_to_none=True)
            codes.zero_grad()
            loss.backward()
            codes.step(opts.lr * frac)
            if opts.norm_lr > 0:
                norms.step()
            measured = None
            if step % opts.eval_every == 0 or step == opts.steps:
                measured = self.kld(held_t, rope, opts.batch)
                if measured < best:
                    best, best_state, best_step, since = measured, self.state(), step, 0
                else:
                    since += 1
            if report:
                report(
                    StepReport(step, float(loss.detach()), measured, best_step, time.perf_counter() - start)
                )
            if since >= opts.patience:
                break
        self.load_state(best_state)
        return best

    def _layer(self, i: int) -> dict[str, torch.Tensor]:
        w: dict[str, torch.Tensor] = {}
        for lin in qwen3.LINEARS:
            name = f"blk.{i}.{lin}.weight"
            w[lin] = self.coded[name].weight() if name in self.coded else self.fixed[name]
        for nm in TRAINED_NORMS:
            w[nm] = self.norms[f"blk.{i}.{nm}.weight"]
        return w

    def _block_error(
        self,
        i: int,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: slice | torch.Tensor,
        y_scale: float,
        rope: qwen3.Rope,
    ) -> torch.Tensor:
        out = qwen3.layer_forward(x[idx], self._layer(i), self.hp, rope)
        return ((out - y[idx]) ** 2).mean() / y_scale

    def train_blocks(
        self,
        tokens: np.ndarray,
        opts: DistillOptions,
        report: Callable[[BlockReport], None] | None = None,
    ) -> None:
        """Block by block, before the end-to-end phase: each decoder layer's codes, block scales
        and norms trained for ``opts.block_steps`` steps so that the layer, fed the quantized
        model's hidden states so far, reproduces the float layer's output on the float model's
        (relative mean squared error; the same held-out windows, the best state per layer kept).
        Codes move by sign steps of ``opts.block_lr`` (decayed linearly) and stay within one code
        of the solver's; d and norms by Adam. ``report(layer, best step, held-out error at step
        0, best held-out error)`` after each layer."""
        n = tokens.shape[0]
        hold = _held_out(n, opts)
        all_t = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        rope = qwen3.Rope.build(self.hp, tokens.shape[1], self.device)
        with torch.no_grad():
            x_f, x_q = self.teacher.embed[all_t], self.student.embed[all_t]
        rng = np.random.default_rng(opts.seed)
        for i in range(self.hp.n_layer):
            with torch.no_grad():
                y = torch.cat(
                    [
                        qwen3.layer_forward(
                            x_f[j : j + opts.block_batch], self.teacher_layers[i], self.hp, rope
                        )
                        for j in range(0, n, opts.block_batch)
                    ]
                )
            coded = [
                self.coded[f"blk.{i}.{lin}.weight"]
                for lin in qwen3.LINEARS
                if f"blk.{i}.{lin}.weight" in self.coded
            ]
            scales = [c.log_scale for c in coded if c.log_scale is not None]
            norms = [self.norms[f"blk.{i}.{nm}.weight"] for nm in TRAINED_NORMS]
            adam = torch.optim.Adam([*scales, *norms], lr=opts.norm_lr, betas=(0.9, 0.99))
            y_scale = float((y * y).mean())

            held = slice(n - hold, n)
            start = time.perf_counter()
            with torch.no_grad():
                first = best = float(self._block_error(i, x_q, y, held, y_scale, rope))
            best_state, best_step = self.state(), 0
            for step in range(1, opts.block_steps + 1):
                idx = torch.from_numpy(
                    rng.choice(n - hold, size=min(opts.block_batch, n - hold), replace=False)
                )
                loss = self._block_error(i, x_q, y, idx.to(self.device), y_scale, rope)
                adam.zero_grad(set_to_none=True)
                for c in coded:
                    c.u.grad = None
                loss.backward()
                lr = opts.block_lr * (1 - (step - 1) / opts.block_steps)
                with torch.no_grad():
                    for c in coded:
                        if c.u.grad is not None:
                            c.u.sub_(torch.sign(c.u.grad), alpha=lr)
                            c.u.copy_(torch.minimum(torch.maximum(c.u, c.c0 - 1), c.c0 + 1))
                adam.step()
                if step % opts.eval_every == 0 or step == opts.block_steps:
                    with torch.no_grad():
                        e = float(self._block_error(i, x_q, y, held, y_scale, rope))
                    if e < best:
                        best, best_state, best_step = e, self.state(), step
            self.load_state(best_state)
            if report:
                report(BlockReport(i, best_step, first, best, time.perf_counter() - start))
            with torch.no_grad():
                x_q = torch.cat(
                    [
                        qwen3.layer_forward(x_q[j : j + opts.block_batch], self._layer(i), self.hp, rope)
                        for j in range(0, n, opts.block_batch)
                    ]
                )
            x_f = y

    def tensors(self) -> dict[str, np.ndarray]:
        """GGUF name -> bytes of every tensor the file takes from the distillation (and the
        solver's other tensors as they were)."""
        out = dict(self.extra)
        out.update({k: c.to_bytes() for k, c in self.coded.items()})
        for k, p in self.norms.items():
            out[k] = ggml.quantize(p.detach().cpu().numpy()[None, :], self.types[k])
        return out


def distilled_layers(
    ckpt: Checkpoint,
    types: dict[str, str],
    solved: Iterator[tuple[int, dict[str, np.ndarray]]],
    tokens: np.ndarray,
    opts: DistillOptions,
    device: str = "cpu",
    report: Callable[[DistillReport], None] | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The solver's layers, all of them first, then distilled, yielded layer by layer as the
    writer takes them: (layer, {GGUF name: bytes})."""
    collected: dict[str, np.ndarray] = {}
    for _, tensors in solved:
        collected.update(tensors)
    d = Distiller(ckpt, types, collected, device)
    with torch.enable_grad():
        if opts.block_steps:
            d.train_blocks(tokens, opts, report)
        if opts.steps:
            d.train(tokens, opts, report)
    out = d.tensors()
    for i in range(ckpt.hparams.n_layer):
        prefix = f"blk.{i}."
        yield i, {k: v for k, v in out.items() if k.startswith(prefix)}
    head = {k: v for k, v in collected.items() if not k.startswith("blk.")}
    if head:  # the solver's output head, not trained here: as it came
        yield HEAD, head
