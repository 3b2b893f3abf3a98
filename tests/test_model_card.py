"""Model cards: every model directory that helper, transfer and train write has a hub card with the right facts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from clp_transfer.transfer.helper import HelperConfig, train_helper
from clp_transfer.model_card import final_name, provenance, write_model_card
from clp_transfer.data.pipeline import prepare
from clp_transfer.train.loop import train
from clp_transfer.train.config import TrainConfig
from clp_transfer.transfer.pipeline import transfer

HELPER = dict(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, block_size=32, batch_size=4,
              learning_rate=3e-3, warmup_steps=2, logging_steps=2, num_threads=1, max_steps=4)


def _card(directory: Path) -> ModelCard:
    path = directory / "README.md"
    assert path.is_file(), f"no model card in {directory}"
    return ModelCard.load(path)  # parses and validates the YAML front matter


@pytest.fixture(scope="module")
def chain(tmp_path_factory, model_factory, fixtures_dir, german_lines):
    """helper (language de) -> transfer from an English source with a card (license mit) at a hub cache path
    -> prepare -> train with a final evaluation."""
    root = tmp_path_factory.mktemp("chain")
    helper = train_helper(HelperConfig(text=[str(fixtures_dir / "german.txt")], output_dir=str(root / "helper-de"),
                                       language=["de"], **HELPER))
    source = root / "hub" / "models--TestOrg--tiny-en" / "snapshots" / "0123abcd"
    shutil.copytree(model_factory("gpt2", "en"), source)
    (source / "README.md").write_text("---\nlicense: mit\nlanguage: [en]\n---\n\n# tiny-en\n", encoding="utf-8")
    target = transfer(str(source), str(helper), str(root / "tiny-de"), method="clp").path
    text = root / "de.txt"
    text.write_text("\n".join(german_lines * 3) + "\n", encoding="utf-8")
    data = prepare(root / "data", 0.004, valid_size_mb=0.002, files=[text], tokenizer=target, block_size=16,
                   num_proc=1, progress=False).path
    run = train(TrainConfig(model=str(target), data=str(data), output_dir=str(root / "run-de"), max_steps=4,
                            block_size=16, per_device_train_batch_size=2, logging_steps=2, eval_steps=0,
                            save_steps=0, embedding_tuning_ratio=0.5, report_to=["jsonl"], progress=False))
    return helper, target, run


def test_helper_card(chain):
    helper, _, _ = chain
    card = _card(helper)
    assert card.data.language == ["de"] and card.data.library_name == "transformers"
    assert card.data.license is None and "clp-transfer" in card.data.tags
    report = json.loads((helper / "helper_report.json").read_text())
    assert f"{report['model']['parameters']:,} parameters" in card.text
    assert "License: not recorded" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text


def test_transfer_card(chain):
    _, target, _ = chain
    card = _card(target)
    report = json.loads((target / "transfer_report.json").read_text())
    # license from the source's card, base model from its hub cache path, language from the helper's card
    assert card.data.license == "mit" and card.data.base_model == "TestOrg/tiny-en"
    assert card.data.language == ["de"] and card.data.pipeline_tag == "text-generation"
    assert "transfer-method-clp" in card.data.tags
    m = report["matching"]
    assert f"**{m['shared']:,} shared**" in card.text and f"**{m['missing']:,} new**" in card.text
    assert m["shared"] + m["missing"] == report["target"]["vocab_size"]
    assert card.text.lstrip().startswith("# tiny-de")  # the final name, not the temporary directory's
    assert "Bits per byte: not measured" in card.text


def test_train_card(chain):
    _, target, run = chain
    card = _card(run.final_dir)
    results = json.loads((run.output_dir / "results.json").read_text())
    assert card.data.base_model == "TestOrg/tiny-en" and card.data.license == "mit"  # inherited
    assert card.data.language == ["de"] and "continued-pretraining" in card.data.tags
    bpb = results["final_eval"]["final_eval_bpb"]
    assert math.isfinite(bpb) and f"**{bpb:.4f} bits per byte**" in card.text
    assert f"{results['steps']:,} optimizer steps, {results['tokens_seen']:,} tokens seen" in card.text
    assert "| embedding-tuning | 2 | embeddings only |" in card.text and "| full | 2 | all parameters |" in card.text
    assert "made by `transfer` (method `clp`)" in card.text
    assert "1 local file(s)" in card.text


def test_provenance_from_gguf_metadata_and_hub_ids(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.license", "apache-2.0")
    w.add_array("general.languages", ["en"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = provenance(tmp_path / "converted-cache-dir", str(path))
    assert p.license == "apache-2.0" and p.language == ["en"] and p.hub_id is None
    assert provenance(None, "EleutherAI/pythia-410m").hub_id == "EleutherAI/pythia-410m"
    assert final_name(Path("/x/.tiny-de.tmp-0123abcd")) == "tiny-de" and final_name(Path("/x/y")) == "y"


def test_unknown_facts_are_left_out_with_a_note(tmp_path, model_factory):
    src, hlp = model_factory("gpt2", "en"), model_factory("gpt2", "de")
    out = transfer(str(src), str(hlp), str(tmp_path / "t")).path
    card = _card(out)
    assert card.data.license is None and card.data.language is None and card.data.base_model is None
    assert "License: not recorded" in card.text and "Language: not recorded" in card.text
    (out / "transfer_report.json").write_text("{}")  # a card that cannot be built is skipped, with a warning
    assert write_model_card(out, "transfer") is None
    with pytest.raises(KeyError):
        write_model_card(out, "no-such-kind")


def test_train_from_scratch_card_claims_no_base_model_or_license(chain):
    _, target, _ = chain
    run = train(TrainConfig(from_scratch=True, model_config=str(target), data=str(target.parent / "data"),
                            output_dir=str(target.parent / "scratch"), max_steps=2, block_size=16,
                            per_device_train_batch_size=2, eval_steps=0, save_steps=0, report_to=["jsonl"],
                            progress=False))
    card = _card(run.final_dir)
    assert card.data.base_model is None and card.data.license is None and card.data.language == ["de"]
    assert "**trained from scratch**" in card.text and "License: not recorded" in card.text


def test_training_data_from_the_hub_goes_into_the_metadata(tmp_path):
    from clp_transfer.model_card import _data_description

    stats = {"source": {"type": "hub", "dataset_name": "oscar", "dataset_config_name": "unshuffled_deduplicated_de",
                        "revision": "refs/convert/parquet"},
             "splits": {"train": {"bytes": 4096 * 2**20, "tokens": 123}}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    line, datasets = _data_description(str(tmp_path))
    assert datasets == ["oscar"] and "config `unshuffled_deduplicated_de`" in line
    assert "parquet conversion `refs/convert/parquet`" in line and "4,096.0 MB" in line
