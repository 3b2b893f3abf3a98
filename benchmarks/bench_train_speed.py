"""Training throughput: ``clp-transfer train`` against the Hugging Face ``Trainer``, same model, data and seed.

Model: GPT-NeoX, 4 layers, d=256, 8k BPE vocabulary (trained here on German text of ../shared/corpora), untied
head; sequences of 256 tokens, batch 8, AdamW (betas 0.9/0.95, wd 0.1), clipping 1.0, cosine schedule with 5%
warm-up, fp32 on CPU. Both trainers read the same blocks in the same order (the Trainer through a sequential
sampler over a dataset laid out in our trainer's order), so their loss curves should agree to within noise.

Each competitor runs in its own child process (peak RSS = that child's ``ru_maxrss``); tokens/s is measured
over the steps after ``--warmup_steps`` from timestamps written at every step.

    python benchmarks/bench_train_speed.py            # -> benchmarks/results/bench_train_speed.json

Competitors: ``hf-trainer``; ``ours`` (eager, fused AdamW, no per-step host sync); ``ours-compile``
(``--torch_compile``: inductor; compile time is excluded by the warm-up); ``minimal-loop`` (forward, backward,
clip, fused AdamW and nothing else, a constant learning rate: the floor of any trainer doing this math, which
bounds what a trainer can gain over another).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPORA = HERE.parent.parent / "shared" / "corpora"

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4)
VOCAB, BLOCK, BATCH = 8000, 256, 8


def build(root: Path, mb: float) -> None:
    """Tokenizer, model and shards in ``root`` (called in a child so the parent's RSS stays small)."""
    import numpy as np

    from clp_transfer.data.shards import ShardWriter, dtype_for_vocab, tokenizer_fingerprint
    from clp_transfer.tiny import save_model, tiny_model, train_tokenizer

    lines: list[str] = []
    size = 0
    for name in ("debian-reference.de.txt.gz", "debian-handbook.de.txt.gz", "libreoffice-help.de.txt.gz"):
        with gzip.open(CORPORA / name, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line.strip())
                    size += len(line.encode())
                if size > mb * 2**20:
                    break
    tok = train_tokenizer(lines, VOCAB, "bpe")
    model = tiny_model("gpt_neox", tok, seed=0, tie_word_embeddings=False, max_position_embeddings=BLOCK,
                       intermediate_size=4 * MODEL["hidden_size"], **MODEL)
    save_model(model, tok, root / "model")
    eos = tok.eos_token_id
    ids = tok(lines)["input_ids"]
    for split, part in (("train", ids[: int(len(ids) * 0.95)]), ("valid", ids[int(len(ids) * 0.95):])):
        with ShardWriter(root / "data" / "tokens" / split, dtype=dtype_for_vocab(len(tok)), tokenizer_name="bench",
                         tokenizer_hash=tokenizer_fingerprint(tok), vocab_size=len(tok), eos_token_id=eos,
                         block_size=BLOCK) as w:
            for d in part:
                w.write(np.array(d + [eos]))
            w.finish(num_documents=len(part), num_bytes=0)


def run_ours(root: Path, steps: int, compile_: bool, out: Path) -> None:
    from clp_transfer.train.loop import TrainConfig, train

    res = train(TrainConfig(
        model=str(root / "model"), data=str(root / "data"), output_dir=str(out), overwrite=True, max_steps=steps,
        per_device_train_batch_size=BATCH, block_size=BLOCK, learning_rate=1e-3, min_lr=1e-4, warmup_ratio=0.05,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, eval_steps=0,
        final_eval=False, save_steps=0, report_to=["jsonl"], seed=0, torch_compile=compile_, progress=False,
    ))
    recs = [json.loads(l) for l in res.log_path.read_text().splitlines()]
    # the trainer logs every step here; the wall clock of a step is the gap between consecutive records
    write_curve(out / "curve.json", [(r["step"], r["loss"]) for r in recs if "loss" in r],
                [r["tokens_per_s"] for r in recs if "loss" in r])


def run_hf(root: Path, steps: int, out: Path) -> None:
    import numpy as np
    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import (AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments)

    from clp_transfer.train.schedule import BlockOrder
    from clp_transfer.data.shards import TokenShards

    shards = TokenShards(root / "data", "train")
    order = BlockOrder(shards.num_blocks(BLOCK), seed=0)

    class Blocks(Dataset):  # global sample g -> the block our trainer uses for g
        def __len__(self) -> int:
            return steps * BATCH

        def __getitem__(self, g: int):
            x = torch.from_numpy(shards.block(int(order.blocks(g, 1)[0]), BLOCK))
            return {"input_ids": x, "labels": x}

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    times: list[float] = []
    losses: list[tuple[int, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-4}, warmup_steps=int(0.05 * steps),
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    InOrder(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    gaps = np.diff([times[0] - (times[1] - times[0])] + times)
    write_curve(out / "curve.json", losses, [BATCH * BLOCK / g for g in gaps])


def run_minimal(root: Path, steps: int, out: Path) -> None:
    """The floor of any trainer with this math: forward, backward, clip, fused AdamW, nothing else (no schedule,
    no logging). If this is not much faster than the Trainer, no trainer can be."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from clp_transfer.train.schedule import BlockOrder
    from clp_transfer.data.shards import TokenShards

    shards = TokenShards(root / "data", "train")
    order = BlockOrder(shards.num_blocks(BLOCK), seed=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    times, losses = [time.perf_counter()], []
    for step in range(steps):
        x = torch.from_numpy(np.stack([shards.block(int(b), BLOCK) for b in order.blocks(step * BATCH, BATCH)]))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((step + 1, float(loss)))
        times.append(time.perf_counter())
    write_curve(out / "curve.json", losses, [BATCH * BLOCK / g for g in np.diff(times)])


def write_curve(path: Path, losses, tokens_per_s) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this child's own peak
    path.write_text(json.dumps({"losses": losses, "tokens_per_s": tokens_per_s, "peak_rss_mb": rss_mb}))


def child(args) -> None:
    root, out = Path(args.root), Path(args.out or args.root)
    if args.child == "build":
        build(root, args.mb)
    elif args.child == "hf-trainer":
        run_hf(root, args.steps, out)
    elif args.child == "minimal-loop":
        run_minimal(root, args.steps, out)
    else:
        run_ours(root, args.steps, args.child == "ours-compile", out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup_steps", type=int, default=10, help="steps excluded from tokens/s (compilation, caches)")
    p.add_argument("--mb", type=float, default=6.0, help="MB of German text to tokenize into shards")
    p.add_argument("--competitors", nargs="+", default=["hf-trainer", "ours", "ours-compile", "minimal-loop"])
    p.add_argument("--output", default=str(HERE / "results" / "bench_train_speed.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import numpy as np

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = [sys.executable, __file__, "--root", str(root), "--steps", str(args.steps), "--mb", str(args.mb)]
        subprocess.run([*base, "--child", "build"], check=True, env=env)
        for name in args.competitors:
            out = root / "runs" / name
            t0 = time.perf_counter()
            proc = subprocess.run([*base, "--child", name, "--out", str(out)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            curve = json.loads((out / "curve.json").read_text())
            tps = curve["tokens_per_s"][args.warmup_steps:]
            results.append({
                "competitor": name, "wall_s": round(wall, 2),
                "tokens_per_s": round(float(np.median(tps)), 1), "tokens_per_s_mean": round(float(np.mean(tps)), 1),
                "peak_rss_mb": round(curve["peak_rss_mb"], 1),
                "losses": curve["losses"],
            })
            print(f"{name:14s} {results[-1]['tokens_per_s']:>10.0f} tokens/s (median after warm-up), "
                  f"wall {wall:.1f} s, peak RSS {results[-1]['peak_rss_mb']} MB", flush=True)
    by = {r["competitor"]: r for r in results}
    summary = {}
    if "hf-trainer" in by:
        ref = by["hf-trainer"]
        ref_loss = dict((s, l) for s, l in ref["losses"])
        for r in results:
            if r is ref:
                continue
            diffs = [abs(l - ref_loss[s]) for s, l in r["losses"] if s in ref_loss]
            summary[r["competitor"]] = {
                "speedup_vs_hf_trainer": round(r["tokens_per_s"] / ref["tokens_per_s"], 2),
                "max_abs_loss_diff": round(max(diffs), 4) if diffs else None,
                "mean_abs_loss_diff": round(float(np.mean(diffs)), 4) if diffs else None,
            }
            print(f"{r['competitor']:14s} {summary[r['competitor']]}")
    payload = {
        "benchmark": "bench_train_speed",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": __import__("torch").get_num_threads()},
        "settings": {"model": {"arch": "gpt_neox", **MODEL, "vocab": VOCAB, "tied": False}, "block": BLOCK,
                     "batch": BATCH, "steps": args.steps, "warmup_steps": args.warmup_steps, "text_mb": args.mb},
        "runs": results, "summary": summary,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
