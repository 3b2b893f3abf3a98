"""``--method auto``: candidates measured on held-out target documents (issue 15)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clp_transfer.errors import ClpError
from clp_transfer.evaluate import score_documents
from clp_transfer.transfer import transfer
from clp_transfer.transfer.auto import Candidate, candidates, choose, screen_and_check
from clp_transfer.transfer.calibration import TargetText, split_check_documents
from clp_transfer.transfer.embeddings import build_problem
from clp_transfer.transfer.methods import EmbeddingSolution, method_params


def tensors(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture()
def de_text(tmp_path, german_lines):
    text = tmp_path / "de.jsonl"
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in german_lines if line.strip()))
    return text


def test_check_documents_split_is_whole_disjoint_seeded_and_bounded():
    lengths = [5, 40, 7, 12, 3, 30, 9, 11, 2, 8] * 3
    a, b, c = (split_check_documents(lengths, 60, seed) for seed in (0, 0, 1))
    assert a == b and a != c  # deterministic for a seed, another seed holds out others
    assert sum(lengths[i] for i in a) <= 60 + max(lengths) and len(a) < len(lengths)
    assert split_check_documents(lengths, 0) == [] and split_check_documents([10], 5) == []
    assert len(split_check_documents([100, 1, 1], 5)) < 3  # one document is always left to fit on


def test_target_text_never_fits_on_its_check_documents(tmp_path, model_factory, de_text):
    from transformers import AutoTokenizer

    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    tok = AutoTokenizer.from_pretrained(hlp_dir)
    src_dir = model_factory("llama", "en", "bpe", tied=True, vocab=420)
    probe = TargetText(src_dir, tok, str(de_text), positions=64, check_tokens=200, seed=3)
    docs = [json.loads(line)["text"] for line in de_text.read_text().splitlines()]
    check = set(probe.check_documents)
    assert check and probe.check_tokens > 0
    fit_texts = [d for d in docs if d not in check]
    # the counts are those of the fit documents only (plus one separator each)
    sep = tok.eos_token_id if tok.bos_token_id is None else tok.bos_token_id
    expected = torch.zeros(len(tok))
    for d in fit_texts:
        for i in [sep] + tok(d, add_special_tokens=False)["input_ids"]:
            expected[i] += 1
    assert torch.equal(probe.counts, expected)
    fit_streams = {tuple(d) for d in probe.fit_documents}
    for d in check:
        assert tuple([sep] + tok(d, add_special_tokens=False)["input_ids"]) not in fit_streams
    # without check tokens nothing is held out (the calibration of other methods is unchanged) ...
    whole = TargetText(src_dir, tok, str(de_text), positions=64)
    assert whole.check_documents == []
    # ... and all_documents=True gives exactly those statistics: the chosen rows are calibrated as standalone
    rows = torch.randn(len(tok), 32, generator=torch.Generator().manual_seed(0))
    h_all, c_all = probe.statistics(rows, all_documents=True)
    h_std, c_std = whole.statistics(rows)
    assert torch.equal(c_all, c_std) and torch.allclose(h_all, h_std, atol=1e-6)
    assert not torch.equal(probe.statistics(rows)[1], c_std)


class FakeProbe:
    """Scores candidates by a fixed table; the screen round adds a per-candidate error."""

    def __init__(self, true: dict[int, float], noise: dict[int, float]):
        self.true, self.noise, self.calls = true, noise, []

    def bits_per_byte(self, input_rows, output_rows=None, max_tokens=None):
        key = int(input_rows[0, 0])
        self.calls.append((key, max_tokens))
        return self.true[key] + (self.noise[key] if max_tokens == 10 else 0.0)


def _cands(n):
    cs = [Candidate(f"c{i}", f"c{i}", "clp", {}, 0.0) for i in range(n)]
    built = {c.name: EmbeddingSolution(torch.full((2, 2), float(i)), None, {}) for i, c in enumerate(cs)}
    return cs, built


def test_the_screen_sends_its_best_finalists_on_and_stops_when_one_is_clearly_ahead():
    cs, built = _cands(6)
    probe = FakeProbe({0: 2.0, 1: 1.5, 2: 1.52, 3: 3.0, 4: 1.51, 5: 2.5}, {0: 0, 1: 0.03, 2: 0, 3: 0, 4: 0, 5: 0})
    winner = screen_and_check(cs, built, probe, screen_tokens=10, check_tokens=40, margin=0.05, finalists=3)
    assert winner.name == "c1"  # third on the screen, best on the whole check part
    assert sorted(k for k, t in probe.calls if t == 40) == [1, 2, 4]  # the best three went on
    cs, built = _cands(6)
    probe = FakeProbe({0: 2.0, 1: 1.5, 2: 1.52, 3: 3.0, 4: 1.51, 5: 2.5}, {0: 0, 1: 0.03, 2: 0, 3: 0, 4: 0, 5: 0})
    assert screen_and_check(cs, built, probe, 10, 40, margin=0.05).name == "c4"  # the default's two finalists: c1 is out
    assert sorted(k for k, t in probe.calls if t == 40) == [2, 4]
    assert "check" not in cs[3].scores and cs[3].scores["screen"] == 3.0
    cs, built = _cands(3)
    probe = FakeProbe({0: 2.0, 1: 1.0, 2: 1.9}, {0: 0, 1: 0, 2: 0})
    assert screen_and_check(cs, built, probe, 10, 40, margin=0.5).name == "c1"
    assert all(t == 10 for _, t in probe.calls)  # ahead by more than the margin: no second round
    cs, built = _cands(3)  # ties go to the earlier candidate
    assert screen_and_check(cs, built, FakeProbe({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0, 1: 0, 2: 0}), 10, 40, 0.05).name == "c0"


def test_candidate_grid_follows_the_parameters():
    names = [c.name for c in candidates(method_params("auto"))]
    assert names == ["clp(pieces_weight=0)@0", "clp(pieces_weight=0)@1", "clp(pieces_weight=0.5)@0",
                     "clp(pieces_weight=0.5)@1", "clp(pieces_weight=1)@0", "clp(pieces_weight=1)@1",
                     "omp(k=8)@0", "omp(k=8)@1"]
    few = candidates(method_params("auto", {"pieces_weights": "1", "calibrate_strengths": "0.5", "omp_k": 0}))
    assert [c.name for c in few] == ["clp(pieces_weight=1)@0.5"]
    assert [(c.method, c.params) for c in few] == [("clp", {"pieces_weight": 1.0, "calibrate": 0.5})]


def test_every_family_is_its_standalone_method():
    # The shared-work rows must be exactly what the winner's own method would build (a family that drifts from
    # it, e.g. fvt's mean row for a token without source pieces instead of clp's similarity row, loses the
    # choice it was scored for). "Дом" has no source pieces here: the pieces_weight=1 family keeps its
    # similarity row.
    from clp_transfer.transfer.auto import family_rows
    from clp_transfer.transfer.methods import compute_target_embeddings

    source = {"Ġthe": 0, "Ġa": 1, "Ġhouse": 2, "Ġis": 3, "Ġh": 4, "aus": 5}
    target = {"Ġthe": 0, "Ġa": 1, "Ġhaus": 2, "Дом": 3, "Ġis": 4, "Ġhouse": 5}
    g = torch.Generator().manual_seed(0)
    task = build_problem(torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g), source, target,
                         method="auto")
    cands = candidates(method_params("auto", {"calibrate_strengths": "0"}))
    rows = family_rows(task.problem, cands, seed=0)
    for c in cands:
        alone = compute_target_embeddings(task.problem, c.method, {**c.params, "calibrate": 0.0}, 0)
        assert torch.allclose(rows[c.family].input, alone.input, atol=1e-6), c.family
    fvt = compute_target_embeddings(task.problem, "fvt", {}, 0)
    assert not torch.allclose(rows["clp(pieces_weight=1)"].input, fvt.input)  # "Дом": similarity, not the mean


def test_a_candidate_without_pieces_is_skipped_with_a_note_not_fatal():
    # Target tokens in another script: the source cannot spell the new ones, so the FVT families are skipped.
    source = {"Ġthe": 0, "Ġa": 1, "Ġhouse": 2, "Ġis": 3}
    target = {"Ġthe": 0, "Ġa": 1, "Дом": 2, "был": 3, "Ġis": 4}
    task = build_problem(torch.randn(4, 8), torch.randn(5, 6), source, target, method="auto")
    probe = FakeScorer()
    solution = choose(task.problem, task.params, probe, seed=0)
    report = {c["name"]: c for c in solution.stats["auto"]["candidates"]}
    assert "source pieces" in report["clp(pieces_weight=1)@0"]["skipped"]
    assert "source pieces" in report["clp(pieces_weight=0.5)@1"]["skipped"]
    assert "skipped" not in report["clp(pieces_weight=0)@0"]
    assert solution.stats["auto"]["choice"] in report and "skipped" not in report[solution.stats["auto"]["choice"]]


class FakeScorer:
    """Calibration statistics of random hidden states; scores = mean squared new row (deterministic)."""

    positions = 8

    def statistics(self, input_rows, positions=None, all_documents=False):
        g = torch.Generator().manual_seed(0)
        return torch.randn(positions or self.positions, input_rows.shape[1], generator=g), torch.ones(input_rows.shape[0])

    def bits_per_byte(self, input_rows, output_rows=None, max_tokens=None):
        return float((input_rows.float() ** 2).mean())


def test_without_text_auto_falls_back_with_a_warning(tmp_path, model_factory, caplog):
    src_dir = model_factory("llama", "en", "bpe", tied=True, vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    with caplog.at_level("WARNING"):
        result = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "o"))
    assert result.report["method"] == "auto"
    assert "fallback" in result.report["new_rows"]["auto"]["reason"]
    assert any("what" in r.message or "Give a few MB" in r.message for r in caplog.records)
    fallback = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "f"), method="clp",
                        params={"pieces_weight": 0.5, "calibrate": 0})
    a, b = tensors(result.path), tensors(fallback.path)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,tied,src_kind,hlp_kind", [
    ("llama", True, "bpe", "bpe"), ("gpt_neox", False, "bpe", "sentencepiece"), ("gpt2", None, "wordpiece", "bpe")])
def test_auto_is_the_default_reports_every_candidate_and_is_deterministic(tmp_path, model_factory, de_text, arch,
                                                                          tied, src_kind, hlp_kind, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = model_factory(arch, "en", src_kind, tied=tied, vocab=420)
    hlp_dir = model_factory("gpt2", "de", hlp_kind, vocab=450, hidden=16)
    opts = dict(calibration_text=str(de_text), calibration_tokens=128, params={"check_tokens": 300,
                                                                              "screen_tokens": 100,
                                                                              "fit_positions": 128})
    with caplog.at_level("INFO"):
        runs = [transfer(str(src_dir), str(hlp_dir), str(tmp_path / n), seed=1, **opts) for n in ("a", "b")]
    auto = runs[0].report["new_rows"]["auto"]
    assert any(f"method auto (chose {auto['choice']}, bits per byte" in r.message for r in caplog.records)
    assert runs[0].report["method"] == "auto" and auto == {**runs[1].report["new_rows"]["auto"],
                                                           "seconds": auto["seconds"]}
    scored = [c for c in auto["candidates"] if "skipped" not in c]
    assert len(scored) >= 4 and all("screen" in c["scores"] for c in scored)
    best = min(c["scores"].get("check", float("inf")) for c in scored)
    chosen = next(c for c in scored if c["name"] == auto["choice"])
    assert chosen["scores"].get("check", chosen["scores"]["screen"]) <= best + 1e-9
    a, b = tensors(runs[0].path), tensors(runs[1].path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the written model is the winner's standalone method on the same text (calibrated on all of it)
    alone = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "alone"), method=chosen["method"], seed=1,
                     params=chosen["params"], calibration_text=str(de_text), calibration_tokens=128)
    c = tensors(alone.path)
    assert set(a) == set(c) and all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    # an uncalibrated winner's score is the exact bits per byte of the written model on the check documents
    model, tok = AutoModelForCausalLM.from_pretrained(runs[0].path), AutoTokenizer.from_pretrained(runs[0].path)
    probe = TargetText(src_dir, tok, str(de_text), positions=128, check_tokens=300, seed=1)
    if "check" in chosen["scores"] and chosen["params"]["calibrate"] == 0:
        exact = score_documents(model, tok, probe.check_documents, block_size=256, max_tokens=300, progress=False)
        assert exact.bits_per_byte == pytest.approx(chosen["scores"]["check"], abs=2e-4)


def test_auto_on_tensors_needs_a_target_text_to_measure():
    source = {"Ġthe": 0, "Ġhouse": 1, "Ġis": 2, "Ġbig": 3}
    target = {"Ġdas": 0, "Ġhouse": 1, "Ġist": 2, "Ġbig": 3}
    from clp_transfer import transfer_embeddings

    r = transfer_embeddings(torch.randn(4, 8), torch.randn(4, 6), source, target, method="auto")
    assert r.report.new_rows["auto"]["reason"].startswith("no target text")
    with pytest.raises(ClpError, match="pieces_weights"):
        transfer_embeddings(torch.randn(4, 8), torch.randn(4, 6), source, target, method="auto",
                            params={"pieces_weights": "2"})
