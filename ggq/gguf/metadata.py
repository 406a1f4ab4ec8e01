"""GGUF metadata for a Qwen3 checkpoint: hyper-parameters, general.*, tokenizer, chat template.

The tokenizer is read from ``tokenizer.json`` directly (no transformers), and the pre-tokenizer
is recognised from its split regex, not from a hash of a sample tokenization.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggq import __version__
from ggq.checkpoint import Checkpoint, CheckpointError

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

# token types, as gguf-py's TokenType
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# split regex of a tokenizer.json pre-tokenizer -> llama.cpp pre-tokenizer name
PRE_TOKENIZERS = {
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "qwen2",
}


@dataclass(frozen=True)
class Provenance:
    method: str = "rtn"
    recipe: str = "F32"
    imatrix_file: str | None = None
    imatrix_sha256: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)  # file, sha256, nsamples, seqlen, seed, damp


def _split_regexes(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        return [pre.get("pattern", {}).get("Regex", "")]
    return []


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def tokenizer_kv(ckpt: Checkpoint) -> dict[str, Any]:
    path = ckpt.path / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the tokenizer ({exc})") from exc
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer model {model.get('type')!r} is not a byte-level BPE")
    regexes = _split_regexes(tok.get("pre_tokenizer"))
    pre = next((PRE_TOKENIZERS[r] for r in regexes if r in PRE_TOKENIZERS), None)
    if pre is None:
        raise CheckpointError(
            f"{path}: pre-tokenizer split regex not recognised (known: {', '.join(PRE_TOKENIZERS.values())})"
        )

    n_vocab = ckpt.hparams.n_vocab
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = np.full(n_vocab, UNUSED, dtype=np.int32)
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, NORMAL
    for added in tok.get("added_tokens", []):
        i, text = added["id"], added["content"]
        if i >= n_vocab:
            raise CheckpointError(f"{path}: added token {text!r} has id {i} beyond vocab_size {n_vocab}")
        tokens[i] = text
        types[i] = CONTROL if added.get("special") or _looks_special(text) else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}
    kv: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    kv.update(_special_ids(ckpt, ids))
    tok_cfg = _json_or_empty(ckpt.path / "tokenizer_config.json")
    kv["tokenizer.ggml.add_bos_token"] = bool(tok_cfg.get("add_bos_token", False))
    kv["tokenizer.ggml.add_eos_token"] = bool(tok_cfg.get("add_eos_token", False))
    template = tok_cfg.get("chat_template")
    jinja = ckpt.path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str):
        kv["tokenizer.chat_template"] = template
    return kv


def _json_or_empty(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def _special_ids(ckpt: Checkpoint, ids: dict[str, int]) -> dict[str, int]:
    """bos / eos / pad: the token strings of tokenizer_config, else the ids of config.json."""
    tok_cfg = _json_or_empty(ckpt.path / "tokenizer_config.json")
    gen_cfg = _json_or_empty(ckpt.path / "generation_config.json")
    out: dict[str, int] = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        text = tok_cfg.get(f"{role}_token")
        if isinstance(text, dict):
            text = text.get("content")
        value: Any = ids.get(text) if isinstance(text, str) else None
        if value is None:
            value = ckpt.config.get(f"{role}_token_id", gen_cfg.get(f"{role}_token_id"))
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    return out


def name_and_size(ckpt: Checkpoint) -> tuple[str, str]:
    """(basename, size label) like llama.cpp's convert: from the directory name when it has a size."""
    import gguf

    name = ckpt.path.resolve().name
    m = re.search(r"(?:^|[-_])(\d+(?:\.\d+)?[KMBT])(?=$|[-_])", name, flags=re.IGNORECASE)
    if m:
        basename = (name[: m.start()] + name[m.end() :]).strip("-_") or name
        return basename, m.group(1).upper()
    return name, gguf.size_label(*ckpt.param_counts())


def _license(ckpt: Checkpoint) -> str | None:
    readme = ckpt.path / "README.md"
    if not readme.is_file():
        return None
    m = re.search(r"^---\s*$(.*?)^---\s*$", readme.read_text(encoding="utf-8", errors="replace"), re.M | re.S)
    lic = re.search(r"^license:\s*(\S+)\s*$", m.group(1), re.M) if m else None
    return lic.group(1) if lic else None


def model_kv(ckpt: Checkpoint, llama_ftype: int, prov: Provenance) -> dict[str, Any]:
    """Every key/value of the file, in the order written."""
    hp = ckpt.hparams
    arch = ckpt.arch.gguf_name
    basename, size = name_and_size(ckpt)
    kv: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": f"{basename} {size}",
        "general.basename": basename,
        "general.size_label": size,
    }
    lic = _license(ckpt)
    if lic:
        kv["general.license"] = lic
    kv.update(
        {
            f"{arch}.block_count": hp.n_layer,
            f"{arch}.context_length": hp.n_ctx_train,
            f"{arch}.embedding_length": hp.n_embd,
            f"{arch}.feed_forward_length": hp.n_ff,
            f"{arch}.attention.head_count": hp.n_head,
            f"{arch}.attention.head_count_kv": hp.n_head_kv,
            f"{arch}.attention.key_length": hp.head_dim,
            f"{arch}.attention.value_length": hp.head_dim,
            f"{arch}.rope.freq_base": hp.rope_theta,
            f"{arch}.attention.layer_norm_rms_epsilon": hp.rms_eps,
        }
    )
    if hp.n_expert:
        kv[f"{arch}.expert_count"] = hp.n_expert
        kv[f"{arch}.expert_used_count"] = hp.n_expert_used
        kv[f"{arch}.expert_feed_forward_length"] = hp.n_ff_exp
    kv.update(_rope_scaling_kv(arch, hp.rope_scaling))
    kv["general.file_type"] = llama_ftype
    kv["general.quantization_version"] = QUANTIZATION_VERSION
    kv.update(tokenizer_kv(ckpt))
    kv["ggq.version"] = __version__
    kv["ggq.method"] = prov.method
    kv["ggq.recipe"] = prov.recipe
    for key, value in prov.calibration.items():
        kv[f"ggq.calibration.{key}"] = value
    if prov.imatrix_file:
        kv["ggq.imatrix.file"] = prov.imatrix_file
        kv["ggq.imatrix.sha256"] = prov.imatrix_sha256 or ""
    return kv


def _rope_scaling_kv(arch: str, scaling: dict[str, Any] | None) -> dict[str, Any]:
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return {}
    out: dict[str, Any] = {f"{arch}.rope.scaling.type": kind}
    if "factor" in scaling:
        out[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    if "original_max_position_embeddings" in scaling:
        out[f"{arch}.rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
    return out
