"""Extend instead of replace: does SmolLM2-135M keep its English and gain German tokens, at step 0?

Source: SmolLM2-135M (float32 safetensors in ``<cache>/smollm2-135m``, tied head). Helper: the benchmark's
German GPT-2 with its own 16k byte-level BPE (``<cache>/helper-de``, made by ``make_helper.py``). Both modes
use the default method ``clp`` calibrated on ``helper_train``.

Texts (bits per byte = NLL / ln 2 / UTF-8 bytes, comparable across tokenizers; tokens per word next to it):
- German: the ``dev`` split (choices) and the ``test`` split (reported) of ``<cache>/splits``;
- English: two disjoint slices of ``en_train.jsonl``, ~30 KB each, of whole documents taken in the order of
  the SHA-256 of their text: ``en_dev`` (choices) and ``en_test`` (reported); the rest of ``en_train`` (minus
  both slices) is the keep text (``--keep_text``) of the variants that use one.

Rows: the source with its own tokenizer; replace mode (the German tokenizer); extend-mode variants. Each
extend variant is also fed the *source's* token ids on English (``*_source_ids``): the extended model then
differs from the source only by the probability its new rows take (the tied source rows are bit-identical),
so ``bpb(source ids) - bpb(source)`` is the stealing and the rest of the English change is the positions whose
tokenization a new token changed. Variants: ``plain`` (no keep text), ``keep`` (new tokens firing on the keep
text left out, ``--keep_text_ratio``) with ``--new_token_guard`` G in ``--guards``. The variant with the best
German dev bits per byte among those whose English dev bits per byte stay within ``--english_budget`` (0.02)
of the source's (else: the best English dev) is scored on the test texts, as is ``plain``.

A rerun reuses the rows of the previous JSON whose settings match (``--fresh`` scores everything again).

    python benchmarks/quality/bench_extend.py --cache /work/main/benchmarks/.cache/quality
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, REPO, ensure_helper, read_jsonl  # noqa: E402

GUARDS = (0.0, 2.0, 5.0)


def english_slices(path: Path, target_bytes: int) -> tuple[list[str], list[str]]:
    """Two disjoint slices of whole documents of about ``target_bytes`` each, in SHA-256 order of the text."""
    docs = sorted((r["text"] for r in read_jsonl(path) if r["text"].strip()),
                  key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    out: list[list[str]] = [[], []]
    k, size = 0, 0
    for text in docs:
        n = len(text.encode("utf-8"))
        if n > target_bytes // 4:  # keep one document from dominating a slice
            continue
        out[k].append(text)
        size += n
        if size >= target_bytes:
            k, size = k + 1, 0
            if k == 2:
                break
    return out[0], out[1]


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def score(model, tok, docs, new_ids=None) -> dict:
    from clp_transfer.evaluate.perplexity import score_documents

    mask = None
    if new_ids:
        mask = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        mask[new_ids] = True
    ctx = getattr(model.config, "max_position_embeddings", None) or 512
    block = min(512, ctx)
    r = score_documents(model, tok, docs, block_size=block, stride=block // 2, batch_size=4, new_token_mask=mask,
                        progress=False)
    out = {"bits_per_byte": round(r.bits_per_byte, 4), "mean_loss": round(r.mean_loss, 4), "tokens": r.num_tokens,
           "bytes": r.num_bytes, "words": r.num_words, "tokens_per_word": round(r.num_tokens / max(1, r.num_words), 3),
           "seconds": round(r.elapsed_s, 1)}
    for k, v in (r.token_classes or {}).items():
        out[f"loss_{k}"] = round(v.mean_loss, 4) if v.num_tokens else None
        out[f"tokens_{k}"] = v.num_tokens
    return out


def stolen_mass(model, tok, docs, new_ids, max_positions: int = 2048) -> float:
    """Mean probability the model gives the new tokens at positions of ``docs`` fed with ``tok``'s ids."""
    ids: list[int] = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"][:512]
        if len(ids) >= max_positions:
            break
    ids = ids[:max_positions]
    total, n = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), 512):
            logits = model(input_ids=torch.tensor([ids[start:start + 512]])).logits[0].float()
            total += float(torch.softmax(logits, -1)[:, new_ids].sum())
            n += logits.shape[0]
    return round(total / n, 5)


def write_keep_text(path: Path, exclude: list[str], out: Path) -> Path:
    """The en_train documents outside both English slices, as JSONL (the variants' --keep_text)."""
    skip = set(exclude)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in read_jsonl(path):
            if r["text"].strip() and r["text"] not in skip:
                f.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--english_bytes", type=int, default=30_000)
    p.add_argument("--english_budget", type=float, default=0.02)
    p.add_argument("--keep_text_ratio", type=float, default=0.1)
    p.add_argument("--guards", type=float, nargs="*", default=list(GUARDS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="do not reuse rows of the previous JSON")
    p.add_argument("--only_source", action="store_true", help="score the source only (needs no helper)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_extend.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from clp_transfer.transfer.pipeline import transfer

    cache = Path(a.cache)
    source, helper = cache / "smollm2-135m", ensure_helper(cache)
    if not a.only_source and not (helper / "helper_report.json").is_file():
        sys.exit(f"the helper is not ready: {helper}/helper_report.json is missing (make_helper.py)")
    calib = cache / "splits" / "helper_train.jsonl"
    texts = {s: [r["text"] for r in read_jsonl(cache / "splits" / f"{s}.jsonl")] for s in ("dev", "test")}
    texts["en_dev"], texts["en_test"] = english_slices(cache / "splits" / "en_train.jsonl", a.english_bytes)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.output).resolve().parent.parent / ".cache" / "bench_extend"
    keep = write_keep_text(cache / "splits" / "en_train.jsonl", texts["en_dev"] + texts["en_test"],
                           work / "en_keep.jsonl")
    old = {} if a.fresh or not Path(a.output).is_file() else json.loads(Path(a.output).read_text())
    res: dict = {"source": str(source), "helper": str(helper), "calibration_text": str(calib),
                 "keep_text": "en_train minus en_dev and en_test",
                 "texts": {k: {"documents": len(v), "bytes": sum(len(t.encode()) for t in v)} for k, v in texts.items()},
                 "english_budget": a.english_budget, "rows": {}, "variants": {}}
    same_texts = old.get("texts") == res["texts"]

    def save() -> None:
        Path(a.output).write_text(json.dumps(res, indent=2) + "\n")

    def show(name: str, row: dict) -> None:
        print(f"{name}: " + ", ".join(f"{k} {v['bits_per_byte']:.4f} bpb {v['tokens_per_word']:.2f} t/w"
                                      for k, v in row.items() if isinstance(v, dict) and "bits_per_byte" in v),
              flush=True)

    from transformers import AutoTokenizer

    src_tok = AutoTokenizer.from_pretrained(source)
    if same_texts and "source" in old.get("rows", {}):
        res["rows"]["source"] = old["rows"]["source"]  # a resumed run: the source's scores do not change
    else:
        model, tok = load(source)
        res["rows"]["source"] = {k: score(model, tok, texts[k]) for k in ("en_dev", "en_test", "test")}
        del model
    show("source", res["rows"]["source"])
    save()
    if a.only_source:
        return
    src_bpb = {k: res["rows"]["source"][k]["bits_per_byte"] for k in ("en_dev", "en_test")}
    if same_texts and "replace" in old.get("rows", {}):
        res["rows"]["replace"] = old["rows"]["replace"]
    else:
        t = time.perf_counter()
        rep = transfer(str(source), str(helper), str(work / "replace"), method="clp", mode="replace",
                       calibration_text=str(calib), overwrite=True)
        secs = round(time.perf_counter() - t, 1)
        model, tok = load(rep.path)
        res["rows"]["replace"] = {"transfer_s": secs, "new_tokens": rep.report["matching"]["missing"],
                                  "test": score(model, tok, texts["test"], rep.report["new_token_ids"])}
        del model
    show("replace", res["rows"]["replace"])
    save()

    variants = {"plain": {}}
    for g in a.guards:
        variants[f"keep, guard {g:g}"] = {"keep_text": str(keep), "keep_text_ratio": a.keep_text_ratio,
                                          "new_token_guard": g}

    def english(row: dict, model, tok, split: str, new_ids: list[int]) -> None:
        """English scores with the extended tokenizer and with the source's ids, and their decomposition."""
        if split not in row:
            row[split] = score(model, tok, texts[split], new_ids)
        row[f"{split}_source_ids"] = score(model, src_tok, texts[split])
        steal = row[f"{split}_source_ids"]["bits_per_byte"] - src_bpb[split]
        row[f"{split}_change"] = {"total": round(row[split]["bits_per_byte"] - src_bpb[split], 4),
                                  "stealing": round(steal, 4),
                                  "tokenization": round(row[split]["bits_per_byte"] - src_bpb[split] - steal, 4)}

    def done(row: dict, split: str) -> bool:
        return split in row and (not split.startswith("en_") or f"{split}_source_ids" in row)

    def run(name: str, opts: dict, splits: tuple[str, ...]) -> dict:
        """Build the variant and score the splits it lacks (a previous row with the same options is reused)."""
        prev = res["variants"].get(name) or ((old.get("variants") or {}).get(name) if same_texts else None)
        if name == "plain" and prev is None and same_texts and "extend" in old.get("rows", {}):
            prev = {**old["rows"]["extend"], "options": {}}  # the first run's plain extension (same code path)
        row = dict(prev) if prev and prev.get("options") == opts else {"options": opts}
        res["variants"][name] = row
        if all(done(row, s) for s in splits) and "stolen_mass_en_dev" in row:
            show(name + " (reused)", row)
            return row
        t = time.perf_counter()
        ext = transfer(str(source), str(helper), str(work / "extend"), method="clp", mode="extend",
                       calibration_text=str(calib), overwrite=True, **opts)
        new_ids = ext.report["new_token_ids"]
        row.update(transfer_s=round(time.perf_counter() - t, 1), new_tokens=len(new_ids),
                   extension=ext.report["extension"], calibration=ext.report["new_rows"].get("calibration"))
        model, tok = load(ext.path)
        for split in splits:
            if done(row, split):
                continue
            if split.startswith("en_"):
                english(row, model, tok, split, new_ids)
            else:
                row[split] = score(model, tok, texts[split], new_ids)
            save()
        if "stolen_mass_en_dev" not in row:
            row["stolen_mass_en_dev"] = stolen_mass(model, src_tok, texts["en_dev"], new_ids)
        save()
        del model
        show(name, row)
        return row

    for name, opts in variants.items():
        run(name, opts, ("en_dev", "dev"))
    dev_rows = {n: r for n, r in res["variants"].items() if n in variants}
    ok = {n: r for n, r in dev_rows.items() if r["en_dev"]["bits_per_byte"] <= src_bpb["en_dev"] + a.english_budget}
    chosen = (min(ok, key=lambda n: ok[n]["dev"]["bits_per_byte"]) if ok
              else min(dev_rows, key=lambda n: dev_rows[n]["en_dev"]["bits_per_byte"]))
    res["chosen"] = chosen
    print(f"chosen on dev: {chosen}", flush=True)
    for name in dict.fromkeys([chosen, "plain"]):
        run(name, variants[name], ("en_dev", "dev", "en_test", "test"))
    save()
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
