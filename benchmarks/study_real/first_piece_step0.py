"""Step-0 probe (issue 22): untie the default ``clp`` init's head and give each new token's output row the
source row of its first piece (``first``), or the mean of that and the clp row (``first+clp``); input rows
stay clp's. Scores the dev subset of ``run_real.py`` (bits per byte, loss on new / shared predicted tokens).

    python benchmarks/study_real/first_piece_step0.py first first+clp   # after run_real.py built inits/clp
"""
import json, sys, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
for d in ("study_real", "quality", "study"):
    sys.path.insert(0, str(REPO / "benchmarks" / d))
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from clp_transfer.transfer.tokens import VocabInfo, decompose
from run_real import dev_subset, score
from run_study import set_threads
set_threads(1)
Q = str(REPO / "benchmarks" / ".cache" / "quality")
init = str(REPO / "benchmarks" / ".cache" / "study_real" / "inits" / "clp")
src = AutoModelForCausalLM.from_pretrained(f"{Q}/smollm2-135m", dtype=torch.float32)
E_s = src.get_input_embeddings().weight.detach()
tv = VocabInfo.from_tokenizer(AutoTokenizer.from_pretrained(init))
sv = VocabInfo.from_tokenizer(AutoTokenizer.from_pretrained(f"{Q}/smollm2-135m"))
pieces = decompose(tv, sv)
rep = json.load(open(f"{init}/transfer_report.json"))
new = rep["new_token_ids"]
docs = dev_subset(Path(Q) / "splits", 20)
tok = AutoTokenizer.from_pretrained(init)
m = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).eval()
t = time.time(); base = score(m, tok, docs, new); print("clp tied", {k: round(v, 3) for k, v in base.items() if isinstance(v, float)}, time.time() - t, flush=True)
W = m.get_input_embeddings().weight.detach().clone()
for variant in sys.argv[1:]:
    out = W.clone()
    for i in new:
        p = pieces[i]
        if not p: continue
        if variant == "first": out[i] = E_s[p[0]]
        elif variant == "first+clp": out[i] = 0.5 * E_s[p[0]] + 0.5 * W[i]
    m2 = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32, tie_word_embeddings=False).eval()
    with torch.no_grad():
        m2.get_input_embeddings().weight.copy_(W)
        m2.lm_head.weight = torch.nn.Parameter(out)
    r = score(m2, tok, docs, new)
    print(variant, {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}, flush=True)
