"""Dev-split exploration of initialisations, in one process: one target model is loaded and only its
embedding matrix is swapped per candidate (the final numbers come from bench_init_quality.py).

    python benchmarks/quality/explore_init.py --max-docs 18 --only fvt clp
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, ensure_helper, read_jsonl  # noqa: E402
from bench_init_quality import smollm2_gguf, score  # noqa: E402

from clp_transfer import build_problem as build_transfer_problem  # noqa: E402
from clp_transfer.transfer.methods import EmbeddingProblem, compute_target_embeddings  # noqa: E402
from clp_transfer.models import SafetensorsCheckpoint, find_embedding_keys, load_tokenizer, resolve_model  # noqa: E402
from clp_transfer.transfer.pipeline import transfer  # noqa: E402


def build_problem(source: Path, helper: Path) -> tuple[EmbeddingProblem, object]:
    """The problem `clp-transfer transfer` solves for this pair (helper rows and FVT pieces both present, as
    the hybrid method needs them), from the public API."""
    src = resolve_model(str(source))
    src_tok, tgt_tok = load_tokenizer(src.path), load_tokenizer(helper)
    ck = SafetensorsCheckpoint(src.path)
    e_s = ck.get(find_embedding_keys(src.path, ck).input)
    hk = SafetensorsCheckpoint(helper)
    e_h = hk.get(find_embedding_keys(helper, hk).input)
    return build_transfer_problem(e_s, e_h, src_tok, tgt_tok, method="hybrid").problem, tgt_tok


CANDIDATES = {
    "fvt": ("fvt", {}),
    "clp": ("clp", {}),
    "mean": ("mean", {}),
    "hybrid.5": ("hybrid", {"alpha": 0.5}),
    "hybrid.8": ("hybrid", {"alpha": 0.8}),
}


def fvt_weighted(problem, model, tok, first=0.5, last=None):
    """Weighted FVT: first piece weight `first`, rest share 1-first (last piece weight `last` if given)."""
    mat = compute_target_embeddings(problem, "fvt").input.clone()
    e = problem.source_input.float()
    for t in problem.missing.tolist():
        ids = problem.pieces[t]
        if len(ids) < 2:
            continue
        w = torch.full((len(ids),), (1 - first) / (len(ids) - 1))
        w[0] = first
        if last is not None and len(ids) > 2:
            w[1:-1] = (1 - first - last) / (len(ids) - 2)
            w[-1] = last
        elif last is not None:
            w[-1] = 1 - first
        mat[t] = w @ e[ids]
    return mat


_H = {}


def calib_hidden(model, tok, n_seq=8, seq=512):
    if "H" in _H:
        return _H["H"]
    texts = [r["text"] for r in read_jsonl(DEFAULT_CACHE / "splits" / "helper_train.jsonl")[:400]]
    ids = []
    for t in texts:
        ids += [0] + tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) > n_seq * seq:
            break
    x = torch.tensor(ids[: n_seq * seq]).view(n_seq, seq)
    with torch.no_grad():
        H = torch.cat([model.model(input_ids=x[i:i + 2]).last_hidden_state.reshape(-1, model.config.hidden_size) for i in range(0, n_seq, 2)])
    _H["H"] = H
    return H


def unigram(tok, v, n_docs=3000):
    if "f" in _H:
        return _H["f"]
    texts = [r["text"] for r in read_jsonl(DEFAULT_CACHE / "splits" / "helper_train.jsonl")[1000:1000 + n_docs]]
    c = torch.zeros(v)
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        c += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=v)[:v].float()
    _H["f"] = c
    return c


def calibrated(problem, model, tok, base="fvt", base_params=None, gamma=1.0, rounds=1, clip=10.0, shared_too=False,
               first=None, norm=None, ls=None):
    """Shift rows along the mean final hidden state so mean predicted prob ~ unigram frequency."""
    if first is not None:
        mat = fvt_weighted(problem, model, tok, first=first)
    else:
        mat = compute_target_embeddings(problem, base, base_params or {}).input.clone()
    if norm is not None:
        e = problem.source_input.float()
        for t in problem.missing.tolist():
            ids = problem.pieces[t]
            if ids:
                target = e[ids].norm(dim=1).mean() if norm == "pieces" else mat[t].norm() * norm
                mat[t] = mat[t] * target / mat[t].norm().clamp_min(1e-6)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(mat)
    H = calib_hidden(model, tok) if "H" not in _H else _H["H"]
    v = problem.source_id.shape[0]
    c = unigram(tok, v)
    f = (c + 0.5) / (c + 0.5).sum()
    u = H.mean(0)
    u = u / (u @ u)
    if ls is not None:  # least-squares direction: h.u ~ 1 at every position
        d = H.shape[1]
        u = torch.linalg.solve(H.T @ H / len(H) + ls * torch.eye(d), H.mean(0))
        hu = H @ u
        print(f"  h.u mean {hu.mean():.3f} std {hu.std():.3f} |u| {u.norm():.4f} vs mean-dir |u| {(1/H.mean(0).norm()):.4f}")
    sel = problem.missing if not shared_too else torch.arange(v)
    for _ in range(rounds):
        pbar = torch.softmax(H @ mat[:v].T, dim=-1).mean(0)
        b = (gamma * (f.log() - pbar.log())).clamp(-clip, clip)
        mat[sel] += b[sel, None] * u[None]
    _H["last_b"] = b
    return mat


def untied(problem, model, tok, out_first=1.0, in_first=None, gamma=1.0, rounds=3, shared_too=True, clip=10.0):
    """Untied head: input rows FVT (mean or weighted), output rows first-piece-weighted FVT, then calibrated."""
    inp = compute_target_embeddings(problem, "fvt").input if in_first is None else fvt_weighted(problem, model, tok, in_first)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(inp)
        model.lm_head.weight = emb
    _H.pop("H", None)
    H = calib_hidden(model, tok)
    out = fvt_weighted(problem, model, tok, first=out_first) if out_first is not None else inp.clone()
    v = problem.source_id.shape[0]
    c = unigram(tok, v)
    f = (c + 0.5) / (c + 0.5).sum()
    u = H.mean(0)
    sel = problem.missing if not shared_too else torch.arange(v)
    for _ in range(rounds):
        pbar = torch.softmax(H @ out[:v].T, dim=-1).mean(0)
        b = (gamma * (f.log() - pbar.log())).clamp(-clip, clip)
        out[sel] += b[sel, None] * (u / (u @ u))[None]
    return inp, out


def collect(model, tok, n_seq=64, seq=512, start=0):
    key = ("HY", n_seq)
    if key in _H:
        return _H[key]
    texts = [r["text"] for r in read_jsonl(DEFAULT_CACHE / "splits" / "helper_train.jsonl")[start:start + 3000]]
    ids = []
    for t in texts:
        ids += [0] + tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) > n_seq * seq + 1:
            break
    x = torch.tensor(ids[: n_seq * seq + 1])
    inp, y = x[:-1].view(n_seq, seq), x[1:].reshape(-1)
    t0 = time.perf_counter()
    with torch.no_grad():
        H = torch.cat([model.model(input_ids=inp[i:i + 4]).last_hidden_state.reshape(-1, model.config.hidden_size)
                       for i in range(0, n_seq, 4)])
    print(f"  collected {len(H)} states in {time.perf_counter() - t0:.0f}s", flush=True)
    _H[key] = (H, y)
    return H, y


def lda_head(problem, model, tok, lam=1.0, shrink=5.0, ridge=0.1, shared_too=False, gamma=0.7, n_seq=64, tied=False,
             rounds=1):
    inp = compute_target_embeddings(problem, "fvt").input.clone()
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(inp)
        model.lm_head.weight = emb
    H, y = collect(model, tok, n_seq)
    v = problem.source_id.shape[0]
    d = H.shape[1]
    mu = H.mean(0)
    Hc = H - mu
    cov = Hc.T @ Hc / len(H)
    cnt = torch.bincount(y, minlength=v)[:v].float()
    sums = torch.zeros(v, d).index_add_(0, y, Hc)
    mu_t = sums / cnt.clamp_min(1)[:, None]  # centred class means
    sol = torch.linalg.solve(cov + ridge * torch.eye(d) * cov.diagonal().mean(), mu_t.T).T  # [v, d]
    wgt = (cnt / (cnt + shrink))[:, None]
    sel = torch.zeros(v, dtype=torch.bool)
    sel[problem.missing] = True
    if shared_too:
        sel[:] = True
    out = inp.clone()
    out[:v][sel] += lam * (wgt * sol)[sel]
    # bias calibration on all tokens (mean direction)
    Hs = H[:: max(1, len(H) // 4096)]
    c = unigram(tok, v)
    f = (c + 0.5) / (c + 0.5).sum()
    u = Hs.mean(0)
    u = u / (u @ u)
    print(f"  |lam*sol| new mean {(lam * wgt * sol)[problem.missing].norm(dim=1).mean():.3f}  |row| {inp.norm(dim=1).mean():.3f}")
    for _ in range(rounds):
        pbar = torch.softmax(Hs @ out[:v].T, dim=-1).mean(0)
        b = (gamma * (f.log() - pbar.log())).clamp(-10, 10)
        out[:v] += b[:, None] * u[None]
    if tied:
        return out
    return inp, out


def untied2(problem, model, tok, in_scale=1.0, in_mode="mean", gamma=0.7, in_method=None, in_params=None):
    fv = compute_target_embeddings(problem, "fvt").input
    inp = fv.clone() if in_method is None else compute_target_embeddings(problem, in_method, in_params or {}).input
    e = problem.source_input.float()
    for t in problem.missing.tolist():
        ids = problem.pieces[t]
        if not ids:
            continue
        if in_mode == "last":
            inp[t] = e[ids[-1]]
        elif in_mode == "first":
            inp[t] = e[ids[0]]
        elif in_mode == "pnorm":
            inp[t] = inp[t] * e[ids].norm(dim=1).mean() / inp[t].norm()
        elif in_mode == "sum":
            inp[t] = e[ids].sum(0)
        elif in_mode == "lin":  # linearly increasing weights toward the last piece
            w = torch.arange(1, len(ids) + 1).float()
            inp[t] = (w / w.sum()) @ e[ids]
    inp[problem.missing] *= in_scale
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(inp)
        model.lm_head.weight = emb
    _H.pop("H", None)
    H = calib_hidden(model, tok)
    v = problem.source_id.shape[0]
    out = fv.clone()
    c = unigram(tok, v)
    f = (c + 0.5) / (c + 0.5).sum()
    u = H.mean(0)
    pbar = torch.softmax(H @ out[:v].T, dim=-1).mean(0)
    b = (gamma * (f.log() - pbar.log())).clamp(-10, 10)
    out[:v] += b[:, None] * (u / (u @ u))[None]
    return inp, out


CANDIDATES.update({
    "u2-mean": (untied2, {}),
    "u2-in-clp": (untied2, {"in_method": "clp"}),
    "u2-in-clp-k30": (untied2, {"in_method": "clp", "in_params": {"top_k": 30, "temperature": 0.1}}),
    "u2-in-hyb.5": (untied2, {"in_method": "hybrid", "in_params": {"alpha": 0.5}}),
    "u2-in-map": (untied2, {"in_method": "map"}),
    "u2-in-mean": (untied2, {"in_method": "mean"}),
    "u2-s.8": (untied2, {"in_scale": 0.8}),
    "u2-s1.25": (untied2, {"in_scale": 1.25}),
    "u2-pnorm": (untied2, {"in_mode": "pnorm"}),
    "u2-last": (untied2, {"in_mode": "last"}),
    "u2-lin": (untied2, {"in_mode": "lin"}),
    "lda1": (lda_head, {}),
    "lda.02": (lda_head, {"lam": 0.02, "gamma": 1.0, "rounds": 3}),
    "lda.05": (lda_head, {"lam": 0.05, "gamma": 1.0, "rounds": 3}),
    "lda.1": (lda_head, {"lam": 0.1, "gamma": 1.0, "rounds": 3}),
    "lda.05-r1": (lda_head, {"lam": 0.05, "ridge": 1.0, "gamma": 1.0, "rounds": 3}),
    "lda.5": (lda_head, {"lam": 0.5}),
    "lda2": (lda_head, {"lam": 2.0}),
    "lda1-all": (lda_head, {"shared_too": True}),
    "lda1-tied": (lda_head, {"tied": True}),
    "cal-ls1": (calibrated, {"shared_too": True, "gamma": 0.7, "ls": 1.0}),
    "cal-ls.1": (calibrated, {"shared_too": True, "gamma": 0.7, "ls": 0.1}),
    "cal-ls.1-g1r3": (calibrated, {"shared_too": True, "gamma": 1.0, "rounds": 3, "ls": 0.1}),
    "cal-ls.01-g1r3": (calibrated, {"shared_too": True, "gamma": 1.0, "rounds": 3, "ls": 0.01}),
    "fvt-norm.8-cal-all-g.7": (calibrated, {"shared_too": True, "norm": 0.8, "gamma": 0.7}),
    "fvt-cal-all-g.5": (calibrated, {"shared_too": True, "gamma": 0.5}),
    "fvt-cal-all-g.7-r2": (calibrated, {"shared_too": True, "gamma": 0.7, "rounds": 2}),
    "hyb.9-cal-all-g.7": (calibrated, {"shared_too": True, "gamma": 0.7, "base": "hybrid", "base_params": {"alpha": 0.9}}),
    "fvt-normp-cal-all": (calibrated, {"shared_too": True, "norm": "pieces"}),
    "fvt-norm1.3-cal-all": (calibrated, {"shared_too": True, "norm": 1.3}),
    "fvt-cal-all-g.7": (calibrated, {"shared_too": True, "gamma": 0.7}),
    "fvt-cal-all-first.6": (calibrated, {"shared_too": True, "first": 0.6}),
    "hyb.8-cal-all": (calibrated, {"shared_too": True, "base": "hybrid", "base_params": {"alpha": 0.8}}),
    "hyb.5-cal-all": (calibrated, {"shared_too": True, "base": "hybrid", "base_params": {"alpha": 0.5}}),
    "clp-cal-all": (calibrated, {"shared_too": True, "base": "clp"}),
    "untied-first1": (untied, {}),
    "untied-first.7": (untied, {"out_first": 0.7}),
    "untied-mean": (untied, {"out_first": None}),
    "untied-first1-newonly": (untied, {"shared_too": False}),
    "fvt-first.5": (fvt_weighted, {"first": 0.5}),
    "fvt-first.7": (fvt_weighted, {"first": 0.7}),
    "fvt-last.5": (fvt_weighted, {"first": 0.25, "last": 0.5}),
    "fvt-cal1": (calibrated, {}),
    "fvt-cal.5": (calibrated, {"gamma": 0.5}),
    "fvt-cal3": (calibrated, {"rounds": 3}),
    "fvt-cal-all": (calibrated, {"shared_too": True}),
    "fvt-cal-all3": (calibrated, {"shared_too": True, "rounds": 3}),
})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-docs", type=int, default=18)
    p.add_argument("--source-ref", action="store_true")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", default=str(DEFAULT_CACHE / "explore.jsonl"))
    a = p.parse_args()
    torch.set_num_threads(2)
    cache = DEFAULT_CACHE
    helper = ensure_helper(cache)
    docs = [r["text"] for r in read_jsonl(cache / "splits" / "dev.jsonl")][::2][: a.max_docs]
    problem, tok = build_problem(smollm2_gguf(), helper)
    work = cache / "work-explore"
    if not (work / "config.json").is_file():
        transfer(str(smollm2_gguf()), str(helper), str(work), method="mean", overwrite=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval()
    new_ids = problem.missing
    emb = model.get_input_embeddings().weight
    if a.source_ref:
        from transformers import AutoModelForCausalLM as A
        sp = resolve_model(str(smollm2_gguf())).path
        r = score(A.from_pretrained(sp, dtype=torch.float32).eval(), load_tokenizer(sp), docs)
        print(f"source own tokenizer: {r['bits_per_byte']:.4f} bpb", flush=True)
    for name in a.only or list(CANDIDATES):
        method, params = CANDIDATES[name]
        t = time.perf_counter()
        if callable(method):
            mat = method(problem, model, tok, **params)
        else:
            mat = compute_target_embeddings(problem, method, params).input
        with torch.no_grad():
            if isinstance(mat, tuple):
                emb.copy_(mat[0])
                model.lm_head.weight = torch.nn.Parameter(mat[1].clone())
            else:
                emb.copy_(mat)
                model.lm_head.weight = emb
        row = {"name": name, "method": str(method), "params": params, **score(model, tok, docs, new_ids)}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        print(f"{name:30s} {row['bits_per_byte']:.4f} bpb  new {row.get('loss_new', 0):.3f} ({row.get('tokens_new')})"
              f"  shared {row.get('loss_shared', 0):.3f}  {row['wall_s']}s", flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
