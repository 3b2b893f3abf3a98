"""What carrying the chat costs and gives, on the real instruct model: SmolLM2-135M-Instruct (GGUF) -> German.

Transfers the source with the benchmark's German helper (``make_helper.py``) with the default ``clp``
(calibrated on ``helper_train``, as ``bench_init_quality.py`` does) twice: with the chat part (the default)
and with ``--no-chat``. Then

- checks what the chat part promises on the real files: the template is the source's, ``<|im_start|>`` /
  ``<|im_end|>`` are one id each after the helper's vocabulary, their rows equal the source's, the eos lists;
- scores both targets in bits per byte on the ``test`` split (the two extra rows of a tied head take part in
  every softmax, so this is the price on plain German text);
- generates greedily from one chat-formatted prompt (the demo's) with the chat target and the source, and
  records whether each stops at an end-of-turn id.

    python benchmarks/quality/bench_chat.py --cache /work/main/benchmarks/.cache/quality
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_init_quality import load, score, smollm2_gguf  # noqa: E402
from common import DEFAULT_CACHE, REPO, ensure_helper, read_jsonl  # noqa: E402

CONTROL = ("<|im_start|>", "<|im_end|>")


def chat_reply(model, tok, max_new_tokens: int = 32) -> dict:
    """Greedy reply to the demo's conversation, rendered with ``tok``'s chat template."""
    from clp_transfer.demo.run import CHAT_MESSAGES

    prompt = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return {"reply": tok.decode(new), "new_tokens": len(new), "stopped": bool(new) and new[-1] in eos,
            "stop_token": tok.convert_ids_to_tokens(new[-1]) if new and new[-1] in eos else None}


def checks(target: Path, source: Path, helper: Path) -> dict:
    """The chat part's promises, read from the files."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tok, s_tok, h_tok = (AutoTokenizer.from_pretrained(p) for p in (target, source, helper))
    with safe_open(source / "model.safetensors", "pt") as f:
        e_s = f.get_tensor("model.embed_tokens.weight")
    with safe_open(target / "model.safetensors", "pt") as f:
        e_t = f.get_tensor("model.embed_tokens.weight")
    t_ids, s_ids = tok.convert_tokens_to_ids(list(CONTROL)), s_tok.convert_tokens_to_ids(list(CONTROL))
    return {
        "template_is_the_sources": tok.chat_template == s_tok.chat_template,
        "helper_vocab": len(h_tok), "target_ids": t_ids, "source_ids": s_ids,
        "one_id_each": all(tok(t, add_special_tokens=False)["input_ids"] == [i] for t, i in zip(CONTROL, t_ids)),
        "rows_equal_source": bool(torch.equal(e_t[t_ids], e_s[s_ids])),
        "embedding_rows": e_t.shape[0],
        "config_eos": json.loads((target / "config.json").read_text())["eos_token_id"],
        "generation_config_eos": json.loads((target / "generation_config.json").read_text())["eos_token_id"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--work", default=None, help="where the two targets go (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_chat.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from clp_transfer.models import resolve_model
    from clp_transfer.transfer.pipeline import transfer

    cache = Path(args.cache)
    helper, gguf = ensure_helper(cache), smollm2_gguf()
    source_dir = resolve_model(str(gguf)).path
    test = [r["text"] for r in read_jsonl(cache / "splits" / "test.jsonl")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-chat-"))
    results: dict = {"source": str(gguf), "helper": str(helper), "test_docs": len(test), "runs": {}}
    try:
        for name, chat in (("chat", True), ("no-chat", False)):
            t = time.perf_counter()
            res = transfer(str(gguf), str(helper), str(work / name), method="clp", overwrite=True, chat=chat,
                           calibration_text=str(cache / "splits" / "helper_train.jsonl"))
            model, tok = load(res.path)
            row = {"transfer_s": round(time.perf_counter() - t, 1), "chat_report": res.report["chat"],
                   "test": score(model, tok, test, res.report["new_token_ids"])}
            if chat:
                row["checks"] = checks(res.path, source_dir, helper)
                row["chat_generation"] = chat_reply(model, tok)
            results["runs"][name] = row
            print(f"{name:8s} test {row['test']['bits_per_byte']:.4f} bpb", flush=True)
        model, tok = load(source_dir)
        results["source_chat_generation"] = chat_reply(model, tok)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    on, off = (results["runs"][k]["test"]["bits_per_byte"] for k in ("chat", "no-chat"))
    results["test_bpb_difference_chat_minus_no_chat"] = on - off
    Path(args.output).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in results["runs"]["chat"].items() if k != "chat_report"}, indent=1,
                     ensure_ascii=False))
    print(f"difference chat - no-chat: {on - off:+.5f} bpb; wrote {args.output}")


if __name__ == "__main__":
    main()
