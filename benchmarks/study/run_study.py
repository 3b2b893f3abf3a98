"""The study (issue 7): do our modifications beat CLP? Tokens saved against from-scratch training.

    python benchmarks/study/run_study.py                      # everything, resumable (done stages are skipped)
    python benchmarks/study/run_study.py --runs scratch clp --seeds 0 1 2
    python benchmarks/study/run_study.py --list-runs

Pipeline (all outputs under ``--cache``, default ``benchmarks/.cache/study/``; results under ``--results``,
default ``benchmarks/results/study/``):

1. ``splits``: the init-quality benchmark's document-level split of ``../shared/corpora``
   (``benchmarks/quality/data.py``: ``test`` and ``dev`` are held out, with a buffer of neighbouring documents
   and verbatim lines removed from training text). Its ``helper_train`` is divided by a hash of each document
   into ``helper_de`` (``--helper_fraction``, trains the helper and its tokenizer) and ``target_de`` (the rest,
   the German continued-pretraining data). ``en_train`` (all English text) pretrains the source.
2. ``source``: an English GPT-NeoX (untied head, like Pythia) with its own English byte-level BPE, pretrained
   for ``--source_minutes`` (``clp_transfer.transfer.helper.train_helper`` with ``architecture=gpt_neox``).
3. ``helper``: a smaller German GPT-2 with its own German BPE, trained for ``--helper_minutes`` on ``helper_de``.
   Its tokenizer is the target vocabulary of every run (so all runs share one tokenizer and token losses are
   comparable between them).
4. ``shards``: ``target_de`` (train) and ``dev`` (valid) as token shards of the German tokenizer.
5. ``inits``: one transferred model per initialisation (``clp_transfer.transfer.pipeline.transfer``); ``scratch`` uses
   the architecture of the transferred model with fresh random weights.
6. ``runs``: every run trains on the same German token stream with the same schedule (``--train_tokens``,
   ``--lr``, ...), evaluated on the whole dev split every ``--evals`` th of the run; step 0 is evaluated with
   the same function. After training, exact bits per byte on the held-out ``test`` documents
   (``clp_transfer.evaluate.perplexity.score_documents``). One JSON per run: ``<results>/runs/<run>-s<seed>.json``.
7. ``analyze.py``: tables (mean ± std over seeds), tokens to reach the from-scratch final dev loss,
   ``<results>/study.json`` and ``<results>/learning_curves.png``.

Threads: the script sets torch (and OMP/MKL, for child libraries) to ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
sys.path.insert(0, str(HERE))

log = logging.getLogger("study")


# ------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    name: str
    init: str  # key of INITS, or "scratch"
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (training variants)
    note: str = ""


# Initialisations: name -> (method, params, transfer options). clp's calibration text is added at run time.
INITS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "random": ("random", {}, {}),
    "mean": ("mean", {}, {}),
    "fvt": ("fvt", {}, {}),
    "clp-original": ("clp-original", {}, {}),
    "clp": ("clp", {}, {}),
    "clp-topk_softmax": ("clp", {"weighting": "topk_softmax"}, {}),
    "clp-topk_uniform": ("clp", {"weighting": "topk_uniform"}, {}),
    "clp-nocalib": ("clp", {"calibrate": 0.0}, {}),
    "clp-no_canonical": ("clp", {}, {"canonical_matching": False}),
    "clp-no_head_fix": ("clp", {}, {"transfer_untied_head": False}),
    "focus": ("peer:focus", {}, {}),
    "wechsel": ("peer:wechsel", {}, {}),
    "map": ("map", {}, {}),
    "hybrid": ("hybrid", {}, {}),
    "omp": ("omp", {}, {}),  # orthogonal matching pursuit, k=64 (mergekit-tokensurgeon's default), uncalibrated
}

RUNS: list[Run] = [
    Run("scratch", "scratch", note="random everything (the paper's baseline)"),
    Run("random", "random", note="source body, random new embeddings"),
    Run("mean", "mean"),
    Run("fvt", "fvt"),
    Run("clp-original", "clp-original", note="published CLP rule"),
    Run("clp", "clp", note="our default: sparsemax T=0.05 + frequency calibration"),
    Run("clp+et10", "clp", {"embedding_tuning_ratio": 0.1}, note="embedding tuning 10% (body frozen)"),
    Run("clp+accel", "clp", {"embedding_tuning_ratio": 0.1, "embedding_freeze_body": False},
        note="accelerated start (10%, body not frozen)"),
    Run("focus", "focus", note="peer FOCUS (deepfocus), fastText on the German training text"),
    Run("wechsel", "wechsel", note="peer WECHSEL, fastText en/de + Ding dictionary"),
    Run("clp-topk_softmax", "clp-topk_softmax"),
    Run("clp-no_head_fix", "clp-no_head_fix", note="untied head left in source positions"),
    Run("clp-nocalib", "clp-nocalib"),
    Run("clp-topk_uniform", "clp-topk_uniform"),
    Run("map", "map", note="ridge map from the helper space to the source space"),
    Run("hybrid", "hybrid", note="mix of FVT pieces and CLP neighbours"),
    Run("clp+et100", "clp", {"embedding_tuning_ratio": 1.0}, note="embedding tuning for the whole run (body frozen)"),
    Run("clp+constant", "clp", {"lr_scheduler_type": "constant"}, note="constant lr after warm-up, no tuning phase"),
    Run("scratch+constant", "scratch", {"lr_scheduler_type": "constant"},
        note="from scratch with the constant schedule (the fair reference for the constant-schedule runs)"),
    Run("clp+et10+constant", "clp", {"embedding_tuning_ratio": 0.1, "lr_scheduler_type": "constant",
                                     "embedding_lr_scheduler_type": "constant"},
        note="embedding tuning 10%, constant schedules in both phases"),
]
# Not run by default: "clp-no_canonical" (raw string matching). Source and target tokenizers are both byte-level
# BPE here, so canonical and raw matching find the same 1,983 shared tokens and the transferred weights are
# bit-identical to "clp" (checked); run it with --runs clp-no_canonical when the tokenizer families differ.
EXTRA_RUNS = [Run("clp-no_canonical", "clp-no_canonical", note="raw string matching")]
RUN_BY_NAME = {r.name: r for r in RUNS + EXTRA_RUNS}
CORE = ["scratch", "random", "mean", "fvt", "clp-original", "clp"]  # run with --seeds; the rest with --variant_seeds


# ------------------------------------------------------------------------------------------- helpers


def set_threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def write_json(path: Path, obj: Any) -> None:
    from clp_transfer.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def doc_bucket(text: str) -> float:
    return int.from_bytes(hashlib.sha256(b"study\0" + text.encode("utf-8")).digest()[:8], "big") / 2**64


# ------------------------------------------------------------------------------------------- stages


def stage_splits(a: argparse.Namespace) -> Path:
    out = a.cache / "splits"
    if (out / "manifest.json").exists():
        return out
    from data import make_splits  # benchmarks/quality/data.py

    from clp_transfer.atomic import atomic_directory

    log.info("splits: building from %s", a.corpora)
    rows, stats = make_splits(a.corpora, seed=0)
    helper = [r for r in rows["helper_train"] if doc_bucket(r["text"]) < a.helper_fraction]
    target = [r for r in rows["helper_train"] if doc_bucket(r["text"]) >= a.helper_fraction]
    parts = {"en_train": rows["en_train"], "helper_de": helper, "target_de": target,
             "dev": rows["dev"], "test": rows["test"]}
    manifest = {"helper_fraction": a.helper_fraction, "split_seed": 0, "excluded": stats.get("buffer"),
                "splits": {k: {"documents": len(v), "bytes": sum(len(r["text"].encode()) for r in v)}
                           for k, v in parts.items()}}
    with atomic_directory(out, overwrite=True) as tmp:
        for k, v in parts.items():
            (tmp / f"{k}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in v), encoding="utf-8")
            (tmp / f"{k}.txt").write_text("".join(r["text"].replace("\n", " ") + "\n" for r in v), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for k, s in manifest["splits"].items():
        log.info("  %-10s %6d documents %11s bytes", k, s["documents"], f"{s['bytes']:,}")
    return out


def stage_model(a: argparse.Namespace, name: str, text: Path, minutes: float, **settings: Any) -> Path:
    from clp_transfer.transfer.helper import HelperConfig, train_helper

    out = a.cache / name
    if (out / "helper_report.json").exists():
        return out
    log.info("%s: training for %.1f min on %s", name, minutes, text.name)
    cfg = HelperConfig(text=[str(text)], output_dir=str(out), time_budget_minutes=minutes, overwrite=True,
                       num_threads=a.threads, torch_compile=False, seed=0, logging_steps=25, **settings)
    train_helper(cfg)
    return out


def stage_shards(a: argparse.Namespace, splits: Path, tokenizer_dir: Path) -> Path:
    import numpy as np
    from transformers import AutoTokenizer

    from clp_transfer.data.shards import ShardWriter, dtype_for_vocab, tokenizer_fingerprint

    out = a.cache / f"shards-b{a.block_size}"
    if (out / "done.json").exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tok.eos_token_id
    info = {}
    for split, src in (("train", "target_de"), ("valid", "dev")):
        docs = [r["text"] for r in read_jsonl(splits / f"{src}.jsonl")]
        n = 0
        with ShardWriter(out / "tokens" / split, dtype=dtype_for_vocab(len(tok)), tokenizer_name=str(tokenizer_dir),
                         tokenizer_hash=tokenizer_fingerprint(tok), vocab_size=len(tok), eos_token_id=eos,
                         block_size=a.block_size, max_shard_tokens=1 << 22) as w:
            for d in docs:
                ids = tok(d)["input_ids"] + [eos]
                n += len(ids)
                w.write(np.array(ids))
            w.finish(num_documents=len(docs), num_bytes=sum(len(d.encode("utf-8")) for d in docs))
        info[split] = {"source": src, "documents": len(docs), "tokens": n}
        log.info("shards: %s = %s, %d documents, %d tokens", split, src, len(docs), n)
    write_json(out / "done.json", info)
    return out


def stage_init(a: argparse.Namespace, name: str, source: Path, helper: Path, splits: Path) -> Path:
    from clp_transfer.transfer.pipeline import transfer

    out = a.cache / "inits" / name
    if (out / ".done").exists():
        return out
    method, params, opts = INITS[name]
    if method.startswith("peer:"):
        import peers

        init_random = stage_init(a, "random", source, helper, splits)
        log.info("init %s (peer)", name)
        if method == "peer:focus":
            return peers.focus_init(source, init_random, splits, out, a.cache, a.threads)
        return peers.wechsel_init(source, init_random, splits, out, a.cache, a.corpora, a.threads)
    opts = dict(opts)
    if method == "clp" and float(params.get("calibrate", 1.0)) > 0:
        opts["calibration_text"] = str(splits / "target_de.jsonl")
    log.info("init %s: method %s params %s options %s", name, method, params, opts)
    transfer(str(source), str(helper), str(out), method=method, params=params, seed=0, overwrite=True, **opts)
    (out / ".done").write_text("ok\n")
    return out


class _CPUAccel:
    """The few attributes of an ``accelerate.Accelerator`` that ``train.evaluate_blocks`` uses."""

    process_index, num_processes = 0, 1

    def __init__(self) -> None:
        import contextlib

        import torch

        self.device = torch.device("cpu")
        self.autocast = contextlib.nullcontext

    def reduce(self, t, op):  # noqa: ANN001
        return t


def eval_dev(model, shards: Path, block: int, batch: int) -> dict[str, float]:  # noqa: ANN001
    """The trainer's evaluation (whole dev split) for a model that has not been trained (step 0)."""
    import numpy as np

    from clp_transfer.data.shards import TokenShards
    from clp_transfer.train.loop import evaluate_blocks

    valid = TokenShards(shards, "valid")
    return evaluate_blocks(model, valid, np.arange(valid.num_blocks(block)), block, batch, _CPUAccel())


def score_test(model, tok, splits: Path, block: int) -> dict[str, Any]:  # noqa: ANN001
    from clp_transfer.evaluate.perplexity import score_documents

    docs = [r["text"] for r in read_jsonl(splits / "test.jsonl")]
    r = score_documents(model, tok, docs, block_size=block, batch_size=8, progress=False)
    return {"bits_per_byte": r.bits_per_byte, "word_perplexity": r.word_perplexity, "token_perplexity": r.token_perplexity,
            "num_tokens": r.num_tokens, "num_bytes": r.num_bytes, "stride": r.stride}


def stage_references(a: argparse.Namespace, source: Path, helper: Path, splits: Path) -> None:
    """Bits per byte on the German test split of the source (English tokenizer) and of the helper."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = a.results / "references.json"
    if out.exists():
        return
    ref = {}
    for name, d in (("source (English model, own tokenizer)", source), ("helper (German GPT-2)", helper)):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ref[name] = score_test(m, AutoTokenizer.from_pretrained(d), splits, a.block_size)
        ref[name]["parameters"] = sum(p.numel() for p in m.parameters())
        ref[name]["report"] = json.loads((d / "helper_report.json").read_text())
        log.info("reference %s: test bpb %.4f", name, ref[name]["bits_per_byte"])
    write_json(out, ref)


def train_settings(a: argparse.Namespace) -> dict[str, Any]:
    tokens_per_step = a.batch_size * a.block_size
    steps = max(10, a.train_tokens // tokens_per_step)
    return dict(max_steps=steps, block_size=a.block_size, per_device_train_batch_size=a.batch_size,
                learning_rate=a.lr, min_lr=a.lr * 0.1, warmup_ratio=a.warmup_ratio, lr_scheduler_type="cosine",
                embedding_learning_rate=a.embedding_lr, eval_steps=max(1, steps // a.evals), eval_batches=10_000,
                per_device_eval_batch_size=16, final_eval=False, logging_steps=max(1, steps // 50), save_steps=0,
                report_to=["jsonl"], progress=False, torch_compile=False)


def stage_run(a: argparse.Namespace, run: Run, seed: int, shards: Path, splits: Path) -> dict[str, Any] | None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clp_transfer.train.loop import TrainConfig, train

    res_path = a.results / "runs" / f"{run.name}-s{seed}.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    settings = train_settings(a)
    settings.update(run.train)
    out = a.cache / "runs" / f"{run.name}-s{seed}"
    if run.init == "scratch":
        arch = a.cache / "inits" / "random"  # architecture + German tokenizer; weights are not used
        cfg = TrainConfig(from_scratch=True, model_config=str(arch), tokenizer=str(arch), data=str(shards),
                          output_dir=str(out), overwrite=True, seed=seed, **settings)
    else:
        init = a.cache / "inits" / run.init
        cfg = TrainConfig(model=str(init), data=str(shards), output_dir=str(out), overwrite=True, seed=seed, **settings)
    # step 0: the exact model training starts from (for scratch: the trainer's own seeded initialisation)
    if run.init == "scratch":
        from transformers import AutoConfig

        torch.manual_seed(seed)  # as train.load_model_and_tokenizer does before from_config
        m0 = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(arch), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(arch)
    else:
        m0 = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cfg.model)
    m0.eval()
    t0 = time.time()
    step0_dev = eval_dev(m0, shards, a.block_size, 16)
    step0_test = score_test(m0, tok, splits, a.block_size)
    del m0
    log.info("run %s seed %d: step 0 dev bpb %.4f, test bpb %.4f; training %d steps", run.name, seed,
             step0_dev["eval_bpb"], step0_test["bits_per_byte"], settings["max_steps"])
    t1 = time.time()
    result = train(cfg)
    t2 = time.time()
    recs = [json.loads(l) for l in result.log_path.read_text().splitlines() if l.strip()]
    tokens_per_step = settings["per_device_train_batch_size"] * settings["block_size"]
    curve = [{"step": 0, "tokens": 0, "eval_loss": step0_dev["eval_loss"], "eval_bpb": step0_dev["eval_bpb"]}]
    train_curve = []
    for r in recs:
        if "eval_loss" in r:
            curve.append({"step": r["step"], "tokens": r.get("tokens", r["step"] * tokens_per_step),
                          "eval_loss": r["eval_loss"], "eval_bpb": r["eval_bpb"]})
        elif "loss" in r:
            train_curve.append({"step": r["step"], "tokens": r.get("tokens"), "loss": r["loss"]})
    model = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32).eval()
    final_test = score_test(model, tok, splits, a.block_size)
    t3 = time.time()
    out_json = {"run": run.name, "seed": seed, "init": run.init, "note": run.note, "train_overrides": run.train,
                "init_method": INITS.get(run.init), "settings": settings, "steps": result.steps,
                "tokens_seen": result.tokens_seen, "step0_dev": step0_dev, "step0_test": step0_test,
                "final_test": final_test, "curve": curve, "train_curve": train_curve,
                "seconds": {"eval_step0": t1 - t0, "train": t2 - t1, "eval_final": t3 - t2}}
    write_json(res_path, out_json)
    log.info("run %s seed %d: final dev bpb %.4f, test bpb %.4f (train %.0f s)", run.name, seed,
             curve[-1]["eval_bpb"], final_test["bits_per_byte"], t2 - t1)
    if not a.keep_models:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out_json


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "study")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "study")
    p.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    p.add_argument("--runs", nargs="*", default=None, help="run names (default: all; see --list-runs)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help=f"training seeds of the core runs {CORE}")
    p.add_argument("--variant_seeds", "--variant-seeds", nargs="*", type=int, default=[0, 1, 2],
                   help="training seeds of the other runs (clp variants, schedules, peers)")
    p.add_argument("--list-runs", "--list_runs", action="store_true")
    p.add_argument("--until", choices=["splits", "source", "helper", "shards", "inits", "runs"], default="runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--helper_fraction", type=float, default=0.3, help="share of German training documents for the helper")
    # source and helper
    p.add_argument("--source_minutes", type=float, default=8.0)
    p.add_argument("--source_vocab", type=int, default=8000)
    p.add_argument("--source_hidden", type=int, default=128)
    p.add_argument("--source_layers", type=int, default=4)
    p.add_argument("--source_heads", type=int, default=4)
    p.add_argument("--source_lr", type=float, default=2e-3)
    p.add_argument("--helper_minutes", type=float, default=3.0)
    p.add_argument("--helper_vocab", type=int, default=8000)
    p.add_argument("--helper_hidden", type=int, default=64)
    p.add_argument("--helper_layers", type=int, default=2)
    p.add_argument("--helper_heads", type=int, default=2)
    # continued pretraining
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--train_tokens", type=int, default=200_000, help="German tokens per run (same for every run)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embedding_lr", type=float, default=3e-3, help="phase-1 lr of the embedding-tuning variants")
    p.add_argument("--warmup_ratio", type=float, default=0.05)
    p.add_argument("--evals", type=int, default=10, help="dev evaluations per run")
    p.add_argument("--keep_models", action="store_true")
    p.add_argument("--no_analyze", action="store_true")
    a = p.parse_args(argv)
    if a.list_runs:
        for r in RUNS:
            print(f"{r.name:18s} init={r.init:18s} {r.train or ''} {r.note}")
        return 0
    runs = [RUN_BY_NAME[n] for n in a.runs] if a.runs else RUNS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_threads(a.threads)
    a.cache.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(a.cache / "study.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(fh)

    splits = stage_splits(a)
    if a.until == "splits":
        return 0
    source = stage_model(a, "source-en", splits / "en_train.jsonl", a.source_minutes, architecture="gpt_neox",
                         vocab_size=a.source_vocab, hidden_size=a.source_hidden, num_layers=a.source_layers,
                         num_heads=a.source_heads, block_size=a.block_size, batch_size=a.batch_size,
                         learning_rate=a.source_lr, warmup_steps=50)
    if a.until == "source":
        return 0
    helper = stage_model(a, "helper-de", splits / "helper_de.jsonl", a.helper_minutes, architecture="gpt2",
                         vocab_size=a.helper_vocab, hidden_size=a.helper_hidden, num_layers=a.helper_layers,
                         num_heads=a.helper_heads, block_size=a.block_size, batch_size=a.batch_size,
                         learning_rate=2e-3, warmup_steps=30)
    if a.until == "helper":
        return 0
    shards = stage_shards(a, splits, helper)
    stage_references(a, source, helper, splits)
    if a.until == "shards":
        return 0
    needed = {"random"} | {r.init for r in runs if r.init != "scratch"}
    for name in [n for n in INITS if n in needed]:
        try:
            stage_init(a, name, source, helper, splits)
        except Exception as e:  # noqa: BLE001 - a failing peer must not stop the study; recorded
            log.exception("init %s failed", name)
            write_json(a.results / "failed" / f"{name}.json", {"init": name, "error": repr(e)})
            runs = [r for r in runs if r.init != name]
    if a.until == "inits":
        return 0
    # seed by seed (all runs of the first seed first), so that an interrupted study has whole seeds
    for seed in sorted(set(a.seeds) | set(a.variant_seeds)):
        for run in runs:
            if seed in (a.seeds if run.name in CORE else a.variant_seeds):
                stage_run(a, run, seed, shards, splits)
    if not a.no_analyze:
        import analyze

        analyze.main(["--results", str(a.results)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
