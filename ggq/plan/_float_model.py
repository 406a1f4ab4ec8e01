"""The float model as the sensitivity pass uses it (torch): one calibration forward gathering the
linears' input Gram matrices, and single-tensor-change KLD probes from cached hidden states."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ggq import qwen3
from ggq.checkpoint import Checkpoint
from ggq.solvers.reductions import gram

# which input each linear reads: q/k/v the attention input, gate/up the MLP input
INPUT_OF = {
    "attn_q": "attn_in",
    "attn_k": "attn_in",
    "attn_v": "attn_in",
    "attn_output": "o_in",
    "ffn_gate": "mlp_in",
    "ffn_up": "mlp_in",
    "ffn_down": "down_in",
    # a Qwen3-MoE layer's merged experts: (n_expert, n_in, n_in) per-expert Gram matrices
    "ffn_gate_exps": "exp_in",
    "ffn_up_exps": "exp_in",
    "ffn_down_exps": "exp_down_in",
}
CACHE_LAYERS_BYTES = 4 << 30  # keep every layer's float32 weights for the probes below this size


@dataclass
class Stats:
    tokens: int
    # (layer, input) -> X^T X float64; (-1, "out"): output's; of a MoE layer's experts (layer,
    # "exp_in" / "exp_down_in") -> (n_expert, n_in, n_in), each expert's routed rows scaled by
    # their routing weight (an expert's output enters the layer's output times that weight)
    h: dict[tuple[int, str], np.ndarray]
    counts: np.ndarray  # (n_vocab,) how often each token is read from token_embd
    tied: bool
    device: str

    def h_of(self, name: str) -> np.ndarray | None:
        if name == "output.weight" or (name == "token_embd.weight" and self.tied):
            return self.h[-1, "out"]
        if name.startswith("blk."):
            _, i, short, _ = name.split(".")
            return self.h[int(i), INPUT_OF[short]]
        return None

    def loss(self, name: str, e: np.ndarray, tied: bool) -> float:
        """tr(E H E^T) / tokens of the error ``e`` (rows, n_in) of tensor ``name``."""
        et = torch.from_numpy(e.astype(np.float64)).to(self.device)
        total = 0.0
        if name == "token_embd.weight":
            c = torch.from_numpy(self.counts.astype(np.float64)).to(self.device)
            total += float((c[:, None] * et * et).sum())
        h = self.h_of(name)
        if h is not None:  # (rows, n) @ (n, n), or per expert (E, rows, n) @ (E, n, n)
            ht = torch.from_numpy(h).to(self.device)
            total += float(((et @ ht) * et).sum())
        return total / self.tokens


@dataclass
class FloatModel:
    ckpt: Checkpoint
    device: str
    batch: int
    tied: bool = False
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    h_cache: list[torch.Tensor] = field(default_factory=list)
    ref: list[torch.Tensor] = field(default_factory=list)  # per probe window: (T, n_vocab) log-probs
    probe_tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.tied = "output.weight" not in self.ckpt.entries
        self.hp = self.ckpt.hparams
        self.out_norm = self._t(self.ckpt.load("output_norm.weight"))
        self.out_w = self._t(self.ckpt.load("token_embd.weight" if self.tied else "output.weight"))
        self.small = self.ckpt.n_params() * 4 < CACHE_LAYERS_BYTES

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.layers:
            return self.layers[i]
        w = qwen3.load_layer(self.ckpt, i, self.device)
        if self.small:
            self.layers[i] = w
        return w

    def calibrate(self, tokens: np.ndarray) -> Stats:
        """One float forward over ``tokens`` (nsamples, seqlen), layer by layer."""
        hp = self.hp
        n_tok = int(tokens.size)
        h_sums: dict[tuple[int, str], torch.Tensor] = {}

        def add(key: tuple[int, str], x: torch.Tensor) -> None:
            g = gram(x)
            h_sums[key] = h_sums[key] + g if key in h_sums else g

        def add_experts(i: int, m: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
            """A MoE layer's per-expert Grams of the batch's MLP input ``m``; returns its output."""
            flat = m.reshape(-1, m.shape[-1])
            r = qwen3.route(flat, w, hp)
            for e in range(hp.n_expert):
                rows, weight = r.tokens_of(e)
                x = flat[rows] * weight[:, None]  # weighted rows: sum of weight^2 x x^T
                add((i, f"exp_in.{e}"), x)
                add((i, f"exp_down_in.{e}"), qwen3.expert_core(flat[rows], w, e) * weight[:, None])
            return qwen3.moe_core(m, w, hp, r)

        rope = qwen3.Rope.build(hp, tokens.shape[1], self.device)
        with torch.no_grad():
            h = qwen3.embed(self.ckpt, torch.from_numpy(tokens)).to(self.device)  # (N, T, n_embd)
            for i in range(hp.n_layer):
                w = self.layer(i)
                for b0 in range(0, h.shape[0], self.batch):
                    hb = h[b0 : b0 + self.batch]
                    x = qwen3.attention_input(hb, w, hp)
                    add((i, "attn_in"), x)
                    a = qwen3.attention_core(x, w, hp, rope)
                    add((i, "o_in"), a)
                    hb = hb + a @ w["attn_output"].T
                    m = qwen3.mlp_input(hb, w, hp)
                    if qwen3.ROUTER in w:
                        h[b0 : b0 + self.batch] = hb + add_experts(i, m, w)
                        continue
                    add((i, "mlp_in"), m)
                    d = qwen3.mlp_core(m, w)
                    add((i, "down_in"), d)
                    h[b0 : b0 + self.batch] = hb + d @ w["ffn_down"].T
            add((-1, "out"), qwen3.rms_norm(h, self.out_norm, hp.rms_eps))
        counts = np.bincount(tokens.reshape(-1), minlength=self.out_w.shape[0]).astype(np.float64)
        h_np = {k: v.cpu().numpy() for k, v in h_sums.items() if "." not in k[1]}
        for i in range(hp.n_layer) if hp.n_expert else ():
            for part in ("exp_in", "exp_down_in"):
                h_np[i, part] = np.stack([h_sums[i, f"{part}.{e}"].cpu().numpy() for e in range(hp.n_expert)])
        return Stats(n_tok, h_np, counts, self.tied, self.device)

    def _layers_from(
        self, h: torch.Tensor, start: int, replaced: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        rope = qwen3.Rope.build(self.hp, h.shape[1], self.device)
        for i in range(start, self.hp.n_layer):
            w = self.layer(i)
            if replaced is not None and i == start:
                w = {**w, **replaced}
            h = qwen3.layer_forward(h, w, self.hp, rope)
        return h

    def _logp(self, h: torch.Tensor, out_w: torch.Tensor) -> torch.Tensor:  # (T, n_embd) -> (T, V)
        return torch.log_softmax(qwen3.rms_norm(h, self.out_norm, self.hp.rms_eps) @ out_w.T, dim=-1)

    def prepare_probes(self, tokens: np.ndarray) -> None:
        """Hidden states at every layer's input and the float log-probs of the probe windows."""
        self.probe_tokens = torch.from_numpy(tokens)
        rope = qwen3.Rope.build(self.hp, tokens.shape[1], self.device)
        with torch.no_grad():
            h = qwen3.embed(self.ckpt, self.probe_tokens).to(self.device)
            self.h_cache = [h]
            for i in range(self.hp.n_layer):
                h = qwen3.layer_forward(h, self.layer(i), self.hp, rope)
                self.h_cache.append(h)
            self.ref = [self._logp(hw, self.out_w) for hw in h]

    def _kld(self, h: torch.Tensor, out_w: torch.Tensor) -> float:
        total, n = 0.0, 0
        for hw, ref in zip(h, self.ref, strict=True):
            logp = self._logp(hw, out_w)
            total += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
            n += hw.shape[0]
        return total / n

    def probe_kld(self, name: str, wq: np.ndarray) -> float:
        """Mean KLD (float -> this tensor replaced by ``wq``) over the probe windows' tokens."""
        assert self.probe_tokens is not None, "prepare_probes first"
        q = self._t(wq)
        with torch.no_grad():
            if name.startswith("blk."):
                _, i, short, _ = name.split(".")
                h = self._layers_from(self.h_cache[int(i)], int(i), {short: q})
                return self._kld(h, self.out_w)
            if name == "output.weight":
                return self._kld(self.h_cache[-1], q)
            if name == "token_embd.weight":
                h = self._layers_from(q[self.probe_tokens], 0, None)
                return self._kld(h, q if self.tied else self.out_w)
        raise ValueError(f"no probe for tensor {name}")
