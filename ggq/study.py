"""`ggq study`: the protocol of the empirical Qwen3 quantization study (arXiv 2505.02214) on GGUF.

Every (method, bits) pair is converted with ``ggq convert`` and every file is evaluated against
the full-precision GGUF with ``ggq ppl --base`` on each text; llama.cpp's own RTN and imatrix
quants of the same types (``llama-quantize``, ``llama-imatrix`` on the calibration text) are the
reference rows. Everything is cached in the output folder under a key of everything that
determines its bytes, so a re-run after an interruption (or with one more method) only does what is
missing, and a change of any of them recomputes what it touches (see ``conversion_key``):

    OUT/gguf/     the GGUF files, named {model}-{type}-{method}-{key}.gguf
    OUT/results/  one JSON per (file, text, context, chunks)
    OUT/study.md  the table, OUT/study.json every number, OUT/ppl.png and OUT/kld.png the plots

Zero-shot tasks run through llama.cpp's own multiple-choice scoring (``llama-perplexity
--hellaswag / --winogrande``) when task files are given with ``--tasks DIR``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ggq import __version__, ggml, native
from ggq.errors import GGQError
from ggq.eval.llama_tools import run
from ggq.files import atomic_write, cache_key, sha256_file
from ggq.plan import recipe as rc
from ggq.solvers.method import METHODS
from ggq.solvers.method import method as method_kind

if TYPE_CHECKING:
    from ggq.convert import ConvertOptions

REFERENCES = ("llama.cpp RTN", "llama.cpp imatrix")


class StudyError(GGQError, ValueError):
    """An option or input the study cannot use; names it."""


@dataclass(frozen=True)
class StudyConfig:
    model: Path
    methods: tuple[str, ...] = ("rtn", "gptq", "awq")
    bits: tuple[str, ...] = ("2", "3", "4", "5", "8")
    texts: tuple[Path, ...] = ()  # empty: WikiText-2 test (shipped)
    out: Path = Path("study")
    base_type: str = "F32"
    calib: Path | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01  # the solvers' options (ggq convert --damp / --act-order / --device)
    act_order: bool = False
    device: str = "auto"
    n_ctx: int = 512
    chunks: int | None = None
    threads: int = 0
    references: bool = True
    tasks: Path | None = None
    budgets: tuple[float, ...] = ()  # bits per weight: one --target-bpw file per method and budget


@dataclass
class Entry:
    """One file of the study: how it is made, where it lives, how it scored."""

    method: str  # a ggq method, "<method> budget", a reference name, or "base"
    bits: str  # "3", ... ("32"/"16" for the base; the bits per weight asked of a budget file)
    type: str  # the file type ("mixed" for a budget file)
    path: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # text name -> ppl row
    tasks: dict[str, float] = field(default_factory=dict)


def _key(*parts: object) -> str:
    return cache_key(*(str(p) for p in parts))


# compiled modules whose code shapes a GGUF (the ggml encoders) or a score (the evaluator)
EXTENSIONS = ("ggq._quants", "ggq._native")


@functools.cache
def source_digest() -> str:
    """sha256 of the code that makes the study's files and numbers: every ``.py`` file of the ggq
    package (relative path and bytes, sorted by path) and the compiled extensions ggq._quants and
    ggq._native where built. The whole package rather than a hand-kept list of the modules a
    conversion imports: a list goes stale silently, while an edit outside the conversion path only
    costs a recompute."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    for name in EXTENSIONS:
        spec = importlib.util.find_spec(name)
        origin = "not built" if spec is None or spec.origin is None else sha256_file(Path(spec.origin))
        h.update(f"{name}\0{origin}\0".encode())
    return h.hexdigest()


def llama_cpp_build() -> str:
    """The llama.cpp build whose tools and library make the reference rows and every score: its
    commit and its back ends (a CUDA build's numbers are not a CPU build's)."""
    mod = native.load()
    return f"{mod.LLAMA_CPP_COMMIT} {','.join(mod.backends())}"


def conversion_key(opts: ConvertOptions, model_digest: str, calib_sha: str, code: str, llama_cpp: str) -> str:
    """Key of the bytes ``ggq convert`` writes for these options: the checkpoint's content, every
    recipe option, the method, the imatrix's content, the calibration options (text by content,
    ``auto`` device resolved, since CUDA arithmetic changes bytes) where the method reads them,
    ggq's version and source digest and the llama.cpp build. Not keyed: ``threads`` (the output
    does not depend on the thread count), ``save_imatrix`` (a second output, not an input) and
    ``cal.max_memory`` (the solver's batch and residual file follow it, not the bytes)."""
    from ggq.solvers.options import resolve_device

    doc: dict[str, Any] = {
        "model": model_digest,
        "recipe": dataclasses.asdict(opts.recipe),
        "method": opts.method,
        "imatrix": sha256_file(opts.imatrix) if opts.imatrix else None,
        "ggq": [__version__, code],
        "llama.cpp": llama_cpp,
    }
    if opts.tensor_overrides or opts.plan_kv:  # a size-budget plan; absent, the keys stay as before
        doc["tensor_overrides"] = [list(t) for t in opts.tensor_overrides]
        doc["plan_kv"] = [list(t) for t in opts.plan_kv]
    if opts.distill.on:  # distillation on; off, the keys stay as before
        doc["distill"] = dataclasses.asdict(opts.distill)
    if opts.kind.needs_calibration:  # rtn reads no calibration: its file is the same for every setting
        cal = dataclasses.asdict(opts.cal)
        cal["calib"] = calib_sha if opts.cal.dataset is None else None
        cal["device"] = resolve_device(opts.cal.device)
        del cal["max_memory"]  # the solver's memory budget: the same bytes (test_solver_memory)
        doc["calibration"] = cal
    return _key(json.dumps(doc, sort_keys=True))


def checkpoint_digest(model: Path) -> str:
    """Content hash of the files a conversion reads (weights, config, tokenizer)."""
    names = sorted(
        p.name
        for p in model.iterdir()
        if p.suffix in (".safetensors", ".json", ".jinja") and p.is_file() and not p.name.startswith(".")
    )
    if not any(n.endswith(".safetensors") for n in names):
        raise StudyError(
            f"{model}: no .safetensors weights (a Hugging Face Qwen3 checkpoint folder is needed)"
        )
    return _key(*(f"{n}:{sha256_file(model / n)}" for n in names))


def _atomic_json(path: Path, doc: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))


def _tool(name: str, *args: str) -> None:
    done = run([str(native.tool_path(name)), *args])
    if done.returncode != 0:
        raise StudyError(f"{name} failed: {done.log.strip().splitlines()[-1:]}")


class Study:
    def __init__(self, cfg: StudyConfig, log: Callable[[str], None] = print) -> None:
        for m in cfg.methods:
            if m not in METHODS:
                raise StudyError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
        for b in cfg.bits:
            if b not in rc.BITS_RECIPES:
                raise StudyError(f"--bits: {b!r} is not one of {', '.join(rc.BITS_RECIPES)}")
        for bpw in cfg.budgets:
            if not (math.isfinite(bpw) and 0 < bpw <= 16):
                raise StudyError(f"--budgets: {bpw:g} is not a number of bits per weight in (0, 16]")
        if cfg.base_type not in ggml.FLOAT_TYPES:
            raise StudyError(f"--base-type {cfg.base_type}: expected one of {', '.join(ggml.FLOAT_TYPES)}")
        if not cfg.model.is_dir():
            raise StudyError(f"{cfg.model}: not a checkpoint folder")
        for t in cfg.texts:
            if not t.is_file():
                raise StudyError(f"{t}: text file not found")
        if cfg.tasks is not None:
            from ggq.tasks import find_tasks

            find_tasks(cfg.tasks)  # a missing or empty task folder fails before hours of work
        if any(method_kind(m).needs_calibration for m in cfg.methods):
            from ggq.solvers.options import resolve_device

            resolve_device(cfg.device)  # --device cuda without CUDA: one line before the base file
        self.cfg = cfg
        self.log = log
        from ggq import calib

        self.calib = cfg.calib or calib.default_text()
        self.calib_sha = sha256_file(self.calib)
        self.digest = checkpoint_digest(cfg.model)
        self.code = source_digest()
        self.llama_cpp = llama_cpp_build()
        self.name = cfg.model.name
        self.gguf_dir = cfg.out / "gguf"
        self.results_dir = cfg.out / "results"

    # -- files ----------------------------------------------------------------------------
    def _path(self, type_name: str, method: str, key: str) -> Path:
        tag = method.replace("llama.cpp ", "llama.cpp-").replace(" ", "-").replace("+", "-")
        return self.gguf_dir / f"{self.name}-{type_name}-{tag}-{key}.gguf"

    def options(self, type_name: str, method: str) -> ConvertOptions:
        """What ``ggq convert`` is given for one file (and what its key is made of)."""
        from ggq.convert import CalibOptions, ConvertOptions

        c = self.cfg
        cal = CalibOptions(self.calib, c.nsamples, c.seqlen, c.seed, c.damp, c.act_order, c.device)
        return ConvertOptions(rc.RecipeOptions(type_name), method=method, threads=c.threads, cal=cal)

    def _gguf(self, type_name: str, method: str, tag: str) -> tuple[Path, ConvertOptions]:
        opts = self.options(type_name, method)
        key = conversion_key(opts, self.digest, self.calib_sha, self.code, self.llama_cpp)
        return self._path(type_name, tag, key), opts

    def _convert(self, out: Path, opts: ConvertOptions) -> None:
        from ggq.checkpoint import Checkpoint
        from ggq.convert import convert

        convert(Checkpoint(self.cfg.model), out, opts)

    def base(self) -> Entry:
        t = self.cfg.base_type
        path, opts = self._gguf(t, "rtn", "base")
        if not path.exists():
            self.log(f"convert {self.name} -> {t} (base)")
            self.gguf_dir.mkdir(parents=True, exist_ok=True)
            self._convert(path, opts)
        return Entry("base", "32" if t == "F32" else "16", t, path)

    def quant(self, method: str, bits: str) -> Entry:
        t = rc.BITS_RECIPES[bits]
        path, opts = self._gguf(t, method, method)
        if not path.exists():
            start = time.perf_counter()
            self.log(f"convert {self.name} --method {method} --type {t}")
            self._convert(path, opts)
            self.log(f"  {path.name}: {time.perf_counter() - start:.0f} s")
        return Entry(method, bits, t, path)

    def budget_quant(self, method: str, bpw: float) -> Entry:
        """``ggq convert --method M --target-bpw B``: per-tensor types from the sensitivity measured
        once per method (cached in the study's folder) and the knapsack; keyed by the options and
        the budget (the plan follows from them)."""
        from ggq.checkpoint import Checkpoint
        from ggq.convert import convert
        from ggq.plan.budget import BudgetRequest, plan_budget

        t = rc.BITS_RECIPES["4"]  # the recipe the planner starts from (what it leaves fixed)
        opts = self.options(t, method)
        key = _key(conversion_key(opts, self.digest, self.calib_sha, self.code, self.llama_cpp), "bpw", bpw)
        path = self._path(f"{bpw:g}bpw", f"{method} budget", key)
        if not path.exists():
            start = time.perf_counter()
            self.log(f"convert {self.name} --method {method} --target-bpw {bpw:g}")
            ckpt = Checkpoint(self.cfg.model)
            req = BudgetRequest(bpw=bpw, cache=self.cfg.out / "sensitivity")
            planned = plan_budget(ckpt, opts, req, lambda line: self.log(f"  {line}"))
            self.gguf_dir.mkdir(parents=True, exist_ok=True)
            convert(ckpt, path, planned.opts)
            self.log(f"  {path.name}: {time.perf_counter() - start:.0f} s")
        return Entry(f"{method} budget", f"{bpw:g}", "mixed", path)

    def imatrix(self, base: Entry) -> Path:
        # the base's name carries its key (checkpoint, ggq's code, llama.cpp build); not keyed:
        # the thread count (ggml gives each output of a product to one thread)
        key = _key(base.path.name, self.calib_sha, self.cfg.n_ctx, self.llama_cpp)
        path = self.gguf_dir / f"{self.name}-imatrix-{key}.gguf"
        if not path.exists():
            self.log(f"llama-imatrix on {self.calib.name}")
            threads = str(self.cfg.threads or len(os.sched_getaffinity(0)))
            with atomic_write(path, ".tmp.gguf") as tmp:  # a .gguf name: llama-imatrix warns otherwise
                _tool(
                    "llama-imatrix",
                    "-m",
                    str(base.path),
                    "-f",
                    str(self.calib),
                    "-o",
                    str(tmp),
                    "-c",
                    str(self.cfg.n_ctx),
                    "-t",
                    threads,
                )
        return path

    def reference(self, name: str, bits: str, base: Entry, imatrix: Path | None) -> Entry:
        t = rc.BITS_RECIPES[bits]
        key = _key(base.path.name, t, imatrix.name if imatrix else "", self.llama_cpp)
        path = self._path(t, name, key)
        if not path.exists():
            self.log(f"llama-quantize {t}" + (" --imatrix" if imatrix else ""))
            extra = ["--imatrix", str(imatrix)] if imatrix else []
            with atomic_write(path, ".tmp.gguf") as tmp:
                _tool("llama-quantize", *extra, str(base.path), str(tmp), t)
        return Entry(name, bits, t, path)

    # -- evaluation -----------------------------------------------------------------------
    def texts(self) -> list[Path]:
        from ggq.eval.perplexity import DEFAULT_TEXT

        return list(self.cfg.texts) or [DEFAULT_TEXT]

    def _progress(self) -> Callable[[int, int, list[tuple[float, float]]], None]:
        """A log line at every tenth of a pass: chunks done and each file's running mean KLD."""
        shown = [0]

        def update(done: int, total: int, running: list[tuple[float, float]]) -> None:
            if done * 10 >= (shown[0] + 1) * total:
                shown[0] = done * 10 // total
                self.log(f"  {done}/{total} chunks  mean KLD " + " ".join(f"{k:.5f}" for _, k in running))

        return update

    def _result_path(self, entry: Entry, text: Path, text_sha: str, base: Entry) -> Path:
        # both names carry their files' keys; the evaluator is ggq's code on llama.cpp's build
        key = _key(
            entry.path.name,
            base.path.name,
            text_sha,
            self.cfg.n_ctx,
            self.cfg.chunks,
            self.code,
            self.llama_cpp,
        )
        return self.results_dir / f"{entry.path.stem}-{text.stem}-{key}.json"

    def evaluate(self, base: Entry, entries: list[Entry]) -> None:
        """Every entry against the base on every text; cached results are read, the rest run in one pass."""
        from ggq.eval.compare import against_base
        from ggq.eval.perplexity import PerplexityConfig, load_text

        config = PerplexityConfig(n_ctx=self.cfg.n_ctx, n_chunks=self.cfg.chunks, n_threads=self.cfg.threads)
        for text in self.texts():
            text_sha = sha256_file(text)
            todo = []
            for e in [base, *entries]:
                cached = self._result_path(e, text, text_sha, base)
                if cached.exists():
                    e.results[text.name] = json.loads(cached.read_text())
                else:
                    todo.append(e)
            if not todo:
                continue
            quants = [e for e in todo if e is not base] or entries[:1]  # the base row comes with any pass
            self.log(f"ggq ppl --base {base.path.name} on {text.name}: {len(quants)} file(s) in one pass")
            rows = against_base(
                base.path,
                [(e.path, "model") for e in quants],
                load_text(text),
                str(text),
                config,
                self._progress(),
            )
            base_ppl = rows[0].ppl.ppl
            for e, row in zip([base, *quants], rows, strict=True):
                doc = row.as_dict(base_ppl)
                e.results[text.name] = doc
                _atomic_json(self._result_path(e, text, text_sha, base), doc)

    # -- the whole run ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        base = self.base()
        entries: list[Entry] = []
        if self.cfg.references:
            imat = self.imatrix(base)
            for bits in self.cfg.bits:
                entries.append(self.reference("llama.cpp RTN", bits, base, None))
                entries.append(self.reference("llama.cpp imatrix", bits, base, imat))
        for method in self.cfg.methods:
            for bits in self.cfg.bits:
                entries.append(self.quant(method, bits))
        for method in self.cfg.methods:
            for bpw in self.cfg.budgets:
                entries.append(self.budget_quant(method, bpw))
        self.evaluate(base, entries)
        if self.cfg.tasks is not None:
            from ggq.tasks import run_tasks

            for e in [base, *entries]:
                e.tasks = run_tasks(
                    e.path,
                    self.cfg.tasks,
                    self.results_dir,
                    self.cfg.threads,
                    self.log,
                    key=f"{self.code} {self.llama_cpp}",
                )
        doc = self.document(base, entries)
        _atomic_json(self.cfg.out / "study.json", doc)
        with atomic_write(self.cfg.out / "study.md") as tmp:
            tmp.write_text(render_markdown(doc))
        write_plots(doc, self.cfg.out)
        return doc

    def document(self, base: Entry, entries: list[Entry]) -> dict[str, Any]:
        texts = [t.name for t in self.texts()]
        rows = []
        for e in [base, *entries]:
            first = e.results[texts[0]]
            row: dict[str, Any] = {
                "method": e.method,
                "bits": e.bits,
                "type": e.type,
                "file": e.path.name,
                "bpw": first["bpw"],
                "size_mib": first["size_mib"],
                "texts": {},
                "tasks": e.tasks,
            }
            for t in texts:
                r = e.results[t]
                kld = r.get("kld") or {}
                row["texts"][t] = {
                    "ppl": r["ppl"],
                    "ppl_err": r["ppl_err"],
                    "delta_ppl": r.get("delta_ppl", 0.0),
                    "kld": kld.get("kld"),
                    "kld_err": kld.get("kld_err"),
                    "kld_p999": kld.get("kld_p999"),
                    "same_top": kld.get("same_top"),
                    "same_top_err": kld.get("same_top_err"),
                    "n_scored": r["n_scored"],
                }
            rows.append(row)
        return {
            "model": str(self.cfg.model),
            "texts": texts,
            "calibration": {
                "file": self.calib.name,
                "sha256": self.calib_sha,
                "nsamples": self.cfg.nsamples,
                "seqlen": self.cfg.seqlen,
                "seed": self.cfg.seed,
            },
            "n_ctx": self.cfg.n_ctx,
            "chunks": self.cfg.chunks,
            "ggq_version": __version__,
            "llama_cpp_commit": native.load().LLAMA_CPP_COMMIT,
            "rows": rows,
            **({"budgets": list(self.cfg.budgets)} if self.cfg.budgets else {}),  # absent: as before
        }


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return (
        format(x, ".2e")
        if spec == "kld" and 0 < abs(x) < 1e-4
        else format(x, ".5f" if spec == "kld" else spec)
    )


def _pm(x: float | None, err: float | None, spec: str) -> str:
    """``x ± err`` in one format (``x`` alone when the uncertainty is unknown, nothing for no value)."""
    value = _fmt(x, spec)
    return f"{value} ± {_fmt(err, spec)}" if value and err is not None else value


def render_markdown(doc: dict[str, Any]) -> str:
    """The table in the paper's layout: method, #W, type, bpw, size, then per text PPL ±, ΔPPL, mean
    KLD ±, the 99.9 % KLD (the tail a chat user feels) and same top p ±."""
    texts = doc["texts"]
    head = ["Method", "#W", "type", "bpw", "MiB"]
    per_text = ("PPL", "ΔPPL", "KLD", "99.9% KLD", "same top p")
    for t in texts:
        head += [f"{c} {t}" for c in per_text]
    if any(r["tasks"] for r in doc["rows"]):
        head += sorted({k for r in doc["rows"] for k in r["tasks"]})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        cells = [
            "full precision" if r["method"] == "base" else r["method"],
            r["bits"],
            r["type"],
            f"{r['bpw']:.2f}",
            f"{r['size_mib']:.1f}",
        ]
        for t in texts:
            x = r["texts"][t]
            cells += [
                f"{x['ppl']:.3f} ± {x['ppl_err']:.3f}",
                "" if r["method"] == "base" else f"{x['delta_ppl']:+.3f}",
                _pm(x["kld"], x.get("kld_err"), "kld"),
                _fmt(x.get("kld_p999"), ".4f"),
                _pm(None if x["same_top"] is None else 100 * x["same_top"],
                    None if x.get("same_top_err") is None else 100 * x["same_top_err"], ".2f")
                + ("" if x["same_top"] is None else "%"),
            ]  # fmt: skip
        for k in head[5 + len(per_text) * len(texts) :]:
            cells.append(_fmt(r["tasks"].get(k), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    cal = doc["calibration"]
    lines += [
        "",
        f"Model `{Path(doc['model']).name}`; KLD and same top p against the full-precision GGUF with llama-perplexity's "
        f"definitions; ctx {doc['n_ctx']}, {'all' if doc['chunks'] is None else doc['chunks']} chunks of each text; "
        f"calibration {cal['file']} ({cal['nsamples']} x {cal['seqlen']} tokens, seed {cal['seed']}); "
        f"ggq {doc['ggq_version']}, llama.cpp {doc['llama_cpp_commit']}.",
    ]
    return "\n".join(lines) + "\n"


def write_plots(doc: dict[str, Any], out: Path) -> None:
    """ppl.png and kld.png, Pareto plots of the first text: PPL and mean KLD against the file's size,
    one line per maker (llama.cpp's RTN and imatrix recipes dashed, each ggq method's fixed recipes
    solid, its size-budget files dash-dotted), the smallest file first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = doc["texts"][0]
    base = next(r for r in doc["rows"] if r["method"] == "base")
    makers = list(dict.fromkeys(r["method"] for r in doc["rows"] if r["method"] != "base"))
    for metric, fname, label in (
        ("ppl", "ppl.png", f"PPL on {text}"),
        ("kld", "kld.png", f"mean KLD vs {base['type']} on {text}"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in makers:
            pts = sorted((r["size_mib"], r["texts"][text][metric]) for r in doc["rows"] if r["method"] == m)
            style = "--" if m in REFERENCES else "-." if m.endswith(" budget") else "-"
            marker = "s" if m.endswith(" budget") else "o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=m)
        if metric == "ppl":
            ax.axhline(base["texts"][text]["ppl"], color="gray", linestyle=":", label=f"{base['type']}")
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.set_title(f"{Path(doc['model']).name}: {label}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_write(out / fname, ".tmp.png") as tmp:  # matplotlib reads the format from the name
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
