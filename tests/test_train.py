"""The trainer: phases, exact resume after SIGKILL, 2-process DDP on CPU, bad inputs, outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clp_transfer.cli import main as cli
from clp_transfer.errors import ClpError
from clp_transfer.train.schedule import BlockOrder, micro_batch_samples, plan_phases, samples_before
from clp_transfer.data.shards import ShardWriter, dtype_for_vocab, tokenizer_fingerprint
from clp_transfer.train.loop import TrainConfig, embedding_parameters, train

BLOCK = 32


def write_shards(data_dir: Path, tokenizer, lines: list[str]) -> Path:
    """Token shards of ``lines`` (train: all but every 5th line, valid: every 5th line), as prepare writes them."""
    splits = {"train": [l for i, l in enumerate(lines) if i % 5], "valid": [l for i, l in enumerate(lines) if not i % 5]}
    eos = tokenizer.eos_token_id
    for split, docs in splits.items():
        with ShardWriter(data_dir / "tokens" / split, dtype=dtype_for_vocab(len(tokenizer)),
                         tokenizer_name="fixture", tokenizer_hash=tokenizer_fingerprint(tokenizer),
                         vocab_size=len(tokenizer), eos_token_id=eos, block_size=BLOCK,
                         max_shard_tokens=5000) as w:
            for d in docs:
                w.write(np.array(tokenizer(d)["input_ids"] + [eos]))
            w.finish(num_documents=len(docs), num_bytes=sum(len(d.encode("utf-8")) for d in docs))
    return data_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_factory, german_lines):
    """A tiny untied GPT-NeoX over a German tokenizer, and shards of the German fixture text."""
    from transformers import AutoTokenizer

    model_dir = model_factory("gpt_neox", "de", tied=False, vocab=400, hidden=32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = write_shards(tmp_path_factory.mktemp("data"), tok, german_lines)
    return model_dir, data


def cfg_for(setup, out: Path, **kw) -> TrainConfig:
    model_dir, data = setup
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), max_steps=8, block_size=BLOCK,
                per_device_train_batch_size=4, logging_steps=1, eval_steps=4, eval_batches=2,
                per_device_eval_batch_size=4, save_steps=0, learning_rate=3e-3, min_lr=3e-4, warmup_ratio=0.25,
                report_to=["jsonl"], progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def losses(log_path: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in log_path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


# ------------------------------------------------------------------------------------------- pure schedule


def test_phases_split_steps_and_warm_up_per_phase():
    ph = plan_phases(100, 0.1, 8, 4, "cosine", "constant", 0.1, 0.5, 0.1)
    assert [(p.name, p.start, p.steps, p.batch_size) for p in ph] == [("embedding-tuning", 0, 10, 4), ("full", 10, 90, 8)]
    assert ph[0].lr_factor(0) < ph[0].lr_factor(4) < 1.0 and ph[0].lr_factor(9) == 1.0  # constant after warm-up
    assert ph[1].lr_factor(10) < 0.2  # phase 2 warms up again
    assert ph[1].lr_factor(99) == pytest.approx(0.1, abs=1e-6)  # cosine ends at min_ratio
    assert plan_phases(10, 0.0, 8, None, "cosine", None, 0, None, 0)[0].name == "full"
    assert [p.name for p in plan_phases(10, 1.0, 8, None, "cosine", None, 0, None, 0)] == ["embedding-tuning"]


def test_data_order_is_a_pure_function_and_covers_each_epoch():
    o1, o2 = BlockOrder(50, seed=7), BlockOrder(50, seed=7)
    assert np.array_equal(o1.blocks(0, 50), o2.blocks(0, 50))
    assert sorted(o1.blocks(0, 50)) == list(range(50))  # one epoch = a permutation
    assert sorted(o1.blocks(50, 50)) == list(range(50)) and not np.array_equal(o1.blocks(0, 50), o1.blocks(50, 50))
    assert np.array_equal(o1.blocks(45, 10), np.concatenate([o2.blocks(45, 5), o2.blocks(50, 5)]))


def test_two_ranks_see_the_samples_of_one_rank_with_twice_the_batch():
    ph = plan_phases(4, 0.5, 8, 2, "constant", None, 0, None, 1)
    assert samples_before(ph, 3, world_size=2, accumulation=1) == 2 * 2 * 2 + 8 * 2
    one = micro_batch_samples(16, 0, 0, 1, 8)
    two = [micro_batch_samples(16, 0, r, 2, 4) for r in range(2)]
    assert one == (16, 8) and two == [(16, 4), (20, 4)]


# ------------------------------------------------------------------------------------------- training runs


def test_embedding_tuning_changes_only_embeddings_then_everything(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(setup, tmp_path / "run", max_steps=4, embedding_tuning_ratio=1.0, embedding_learning_rate=1e-2)
    res = train(cfg)
    before = AutoModelForCausalLM.from_pretrained(setup[0])
    after = AutoModelForCausalLM.from_pretrained(res.final_dir)
    emb_ids = {id(p) for p in embedding_parameters(before)}
    emb_names = {n for n, p in before.named_parameters() if id(p) in emb_ids}
    assert len(emb_names) == 2  # untied: input embedding and output head
    sb, sa = before.state_dict(), after.state_dict()
    for name in sb:
        if name in emb_names:
            assert not torch.equal(sb[name], sa[name]), f"{name} did not learn in phase 1"
        else:
            assert torch.equal(sb[name], sa[name]), f"{name} changed while the body was frozen"
    # a full run with a phase 1 then moves the body too
    res2 = train(cfg_for(setup, tmp_path / "run2", max_steps=4, embedding_tuning_ratio=0.5))
    after2 = AutoModelForCausalLM.from_pretrained(res2.final_dir).state_dict()
    assert not torch.equal(sb["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], after2["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"])
    events = [json.loads(l) for l in res2.log_path.read_text().splitlines()]
    assert any(e.get("event") == "phase_end" and e["step"] == 2 for e in events)


def test_outputs_logs_plot_and_loss_decreases(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = train(cfg_for(setup, tmp_path / "run", max_steps=16, eval_steps=8))
    recs = [json.loads(l) for l in res.log_path.read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all({"loss", "lr", "tokens", "tokens_per_s"} <= set(r) for r in steps)
    assert steps[-1]["tokens"] == 16 * 4 * BLOCK
    assert sum(r["loss"] for r in steps[-4:]) < sum(r["loss"] for r in steps[:4])
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8, 16] and all(math.isfinite(r["eval_bpb"]) for r in evals)
    assert res.final_eval and res.final_eval["final_eval_loss"] < evals[0]["eval_loss"] + 1.0
    assert (res.output_dir / "logs" / "loss.png").stat().st_size > 1000
    assert list((res.output_dir / "logs" / "tensorboard").glob("*")) == []  # jsonl only was asked
    model = AutoModelForCausalLM.from_pretrained(res.final_dir)
    tok = AutoTokenizer.from_pretrained(res.final_dir)
    assert (res.final_dir / "model.safetensors").is_file() and (res.final_dir / "train_config.yaml").is_file()
    out = model.generate(**tok("Die", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 2
    assert json.loads((res.output_dir / "results.json").read_text())["tokens_seen"] == 16 * 4 * BLOCK


def test_tensorboard_events_are_written(setup, tmp_path):
    res = train(cfg_for(setup, tmp_path / "run", max_steps=2, report_to=["jsonl", "tensorboard"], final_eval=False))
    assert list((res.output_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_from_scratch_baseline_uses_the_architecture_not_the_weights(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, _ = setup
    res = train(cfg_for(setup, tmp_path / "run", model=None, from_scratch=True, model_config=str(model_dir),
                        max_steps=1, learning_rate=1e-9, min_lr=0.0))
    a = AutoModelForCausalLM.from_pretrained(res.final_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert a.keys() == b.keys()
    assert not torch.allclose(a["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], b["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"])


def test_checkpoints_keep_the_last_k(setup, tmp_path):
    res = train(cfg_for(setup, tmp_path / "run", max_steps=7, save_steps=2, save_total_limit=2))
    names = sorted(p.name for p in (res.output_dir / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]
    state = json.loads((res.output_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * 4 * BLOCK


def _run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "clp_transfer.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _flags(setup, out: Path, **kw) -> list[str]:
    model_dir, data = setup
    base = dict(model=model_dir, data=data, output_dir=out, max_steps=10, block_size=BLOCK,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1, eval_steps=5,
                eval_batches=1, save_steps=3, learning_rate=3e-3, embedding_tuning_ratio=0.3, seed=5,
                report_to="jsonl")
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))] + ["--no-progress"]


def test_resume_after_sigkill_gives_the_same_losses(setup, tmp_path):
    """Kill -9 after step 7 (last checkpoint: step 6), resume, and compare with an uninterrupted run."""
    ref = _run_cli(["train", *_flags(setup, tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    crashed = _run_cli(["train", *_flags(setup, tmp_path / "run")], {"CLP_TRANSFER_FAULT_AT_STEP": "7"})
    assert crashed.returncode == -9
    assert not (tmp_path / "run" / "final").exists()
    assert max(losses(tmp_path / "run" / "logs" / "train_log.jsonl")) == 7
    again = _run_cli(["train", *_flags(setup, tmp_path / "run")])
    assert again.returncode == 2 and "--resume" in again.stderr  # an occupied run directory is refused
    resumed = _run_cli(["train", *_flags(setup, tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(tmp_path / "ref" / "logs" / "train_log.jsonl"), losses(tmp_path / "run" / "logs" / "train_log.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    ra = json.loads((tmp_path / "ref" / "results.json").read_text())["final_eval"]["final_eval_loss"]
    rb = json.loads((tmp_path / "run" / "results.json").read_text())["final_eval"]["final_eval_loss"]
    assert abs(ra - rb) <= 1e-5
    assert json.loads((tmp_path / "run" / "results.json").read_text())["resumed_from_step"] == 6


def test_resume_refuses_changed_settings(setup, tmp_path):
    train(cfg_for(setup, tmp_path / "run", max_steps=2, save_steps=1))
    with pytest.raises(ClpError, match="seed"):
        train(cfg_for(setup, tmp_path / "run", max_steps=2, save_steps=1, seed=99, resume=True))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_cpu_processes_match_one_process_with_double_batch(setup, tmp_path):
    """DDP on 2 CPU processes (gloo) through torchrun: same losses as 1 process with twice the batch."""
    flags2 = _flags(setup, tmp_path / "ddp", per_device_train_batch_size=2, max_steps=4, save_steps=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "clp_transfer.cli", "train", *flags2], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    single = _run_cli(["train", *_flags(setup, tmp_path / "one", per_device_train_batch_size=4, max_steps=4,
                                        save_steps=2)])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = losses(tmp_path / "ddp" / "logs" / "train_log.jsonl"), losses(tmp_path / "one" / "logs" / "train_log.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["processes"] == 2


# ------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_with_clear_messages(setup, tmp_path, model_factory, german_lines):
    from transformers import AutoTokenizer

    model_dir, data = setup
    with pytest.raises(ClpError, match="context length"):
        train(cfg_for(setup, tmp_path / "a", block_size=100_000))
    other = model_factory("gpt_neox", "de", tied=False, vocab=300, hidden=32)
    with pytest.raises(ClpError, match="another tokenizer|made with tokenizer"):
        train(cfg_for(setup, tmp_path / "b", model=str(other)))
    big_tok_model = model_factory("gpt_neox", "de", tied=False, vocab=600, hidden=32)
    big_data = write_shards(tmp_path / "bigdata", AutoTokenizer.from_pretrained(big_tok_model), german_lines)
    with pytest.raises(ClpError, match="larger than the model's embedding"):
        train(cfg_for(setup, tmp_path / "c", data=str(big_data), tokenizer=str(big_tok_model)))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(ClpError, match="--overwrite"):
        train(cfg_for(setup, tmp_path / "d"))
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    with pytest.raises(ClpError, match="no token shards"):
        train(cfg_for(setup, tmp_path / "e", data=str(tmp_path / "nothing")))
    for p in ("a", "b", "c", "e"):
        assert not (tmp_path / p / "final").exists()
    # --overwrite with bad data keeps the old run: it is only removed once the new run passed every check
    good = train(cfg_for(setup, tmp_path / "f", max_steps=1, final_eval=False))
    with pytest.raises(ClpError, match="context length"):
        train(cfg_for(setup, tmp_path / "f", block_size=100_000, overwrite=True))
    assert (good.final_dir / "model.safetensors").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    with pytest.raises(ClpError, match="loss became nan"):
        train(cfg_for(setup, tmp_path / "run", max_steps=20, save_steps=2, learning_rate=1e12, min_lr=0.0,
                      max_grad_norm=0.0, warmup_ratio=0.0))
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert not (tmp_path / "run" / "final").exists()
    for ck in ckpts:  # every checkpoint that was written holds finite weights
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(ck / "model.safetensors").values())


def test_cli_config_file_and_flag_override(setup, tmp_path):
    model_dir, data = setup
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {model_dir}\ndata: {data}\nmax_steps: 3\nblock_size: {BLOCK}\n"
                         "per_device_train_batch_size: 2\nlogging_steps: 1\nreport_to: [jsonl]\nsave_steps: 0\n")
    assert cli(["train", "--config", str(yaml_file), "--output_dir", str(tmp_path / "o"), "--max_steps", "2",
                "--no-progress"]) == 0
    assert max(losses(tmp_path / "o" / "logs" / "train_log.jsonl")) == 2
    with pytest.raises(SystemExit):
        cli(["train", "--config", str(yaml_file), "--output_dir", str(tmp_path / "o2"), "--max_stepz", "2"])


def test_token_budget_sets_the_steps(setup, tmp_path):
    res = train(cfg_for(setup, tmp_path / "run", max_tokens=5 * 4 * BLOCK, max_steps=1000, final_eval=False))
    assert res.steps == 5 and res.tokens_seen == 5 * 4 * BLOCK


def test_embedding_parameters_any_architecture(model_factory):
    from transformers import AutoModelForCausalLM

    for arch, tied, n in (("gpt2", None, 1), ("llama", False, 2), ("gpt_neox", False, 2), ("llama", True, 1)):
        m = AutoModelForCausalLM.from_pretrained(model_factory(arch, "en", tied=tied))
        assert len(embedding_parameters(m)) == n


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_configs_are_valid(path):
    from clp_transfer.config import from_dict, load_yaml

    cfg = from_dict(TrainConfig, load_yaml(path), where=str(path))
    cfg.model, cfg.data, cfg.output_dir = cfg.model or "m", "d", "o"
    cfg.validate()


def test_tiny_cpu_config_trains_with_overrides(setup, tmp_path):
    model_dir, data = setup
    assert cli(["train", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--model", str(model_dir), "--data", str(data),
                "--output_dir", str(tmp_path / "o"), "--max_steps", "4", "--block_size", str(BLOCK),
                "--report_to", "jsonl", "--no-progress"]) == 0
    saved = (tmp_path / "o" / "run_config.yaml").read_text()
    assert "embedding_tuning_ratio: 0.5" in saved and "max_steps: 4" in saved


# ------------------------------------------------------------------------------------------- study levers


def test_sequential_order_reads_blocks_in_corpus_order_every_epoch():
    o = BlockOrder(7, seed=3, shuffle=False)
    assert list(o.blocks(0, 7)) == list(range(7)) and list(o.blocks(5, 4)) == [5, 6, 0, 1]


def test_warmup_steps_replace_the_ratio_and_are_capped():
    ph = plan_phases(100, 0.0, 8, None, "cosine", None, 0.01, None, 0.1, warmup_steps=10)
    assert ph[0].warmup_steps == 10 and ph[0].lr_factor(0) < 0.1 and ph[0].lr_factor(10) == 1.0
    assert plan_phases(5, 0.0, 8, None, "cosine", None, 0.01, None, 0.1, warmup_steps=50)[0].warmup_steps == 4


def test_row_scales_rescale_each_rows_update_exactly():
    from clp_transfer.train.loop import scale_row_updates

    before = torch.randn(5, 3)
    p = torch.nn.Parameter(before + 1.0)  # every row moved by +1
    scale_row_updates([p], [before], torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25]))
    assert torch.allclose(p.detach() - before, torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25])[:, None].expand(5, 3))


def _with_report(model_dir: Path, tmp_path: Path, new_ids: list[int]) -> Path:
    import shutil

    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    (out / "transfer_report.json").write_text(json.dumps({"new_token_ids": new_ids}))
    return out


def test_new_rows_only_phase_keeps_shared_rows_and_body(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    new = list(range(100, 300))
    model = _with_report(setup[0], tmp_path, new)
    res = train(cfg_for(setup, tmp_path / "run", model=str(model), max_steps=3, embedding_tuning_ratio=1.0,
                        embedding_tuning_rows="new", embedding_learning_rate=1e-2))
    mb, ma = AutoModelForCausalLM.from_pretrained(model), AutoModelForCausalLM.from_pretrained(res.final_dir)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        wb, wa = getattr(mb, get)().weight.detach(), getattr(ma, get)().weight.detach()
        shared = [i for i in range(wb.shape[0]) if i not in set(new)]
        assert torch.equal(wb[shared], wa[shared]), f"shared rows of {get} moved"
        assert not torch.equal(wb[new], wa[new]), f"new rows of {get} did not learn"
    sb, sa = mb.state_dict(), ma.state_dict()
    assert torch.equal(sb["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], sa["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"])


def test_new_token_multiplier_zero_freezes_new_rows_and_needs_a_report(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    new = list(range(50, 120))
    model = _with_report(setup[0], tmp_path, new)
    res = train(cfg_for(setup, tmp_path / "run", model=str(model), max_steps=2, new_token_lr_multiplier=0.0))
    wb = AutoModelForCausalLM.from_pretrained(model).get_input_embeddings().weight.detach()
    wa = AutoModelForCausalLM.from_pretrained(res.final_dir).get_input_embeddings().weight.detach()
    assert torch.equal(wb[new], wa[new]) and not torch.equal(wb, wa)
    with pytest.raises(ClpError, match="transfer_report.json"):
        train(cfg_for(setup, tmp_path / "run2", max_steps=2, new_token_lr_multiplier=3.0))


def test_eval_callback_results_join_the_evaluation_records(setup, tmp_path):
    seen = []

    def cb(model, step):
        assert not model.training
        seen.append(step)
        return {"custom_metric": float(step)}

    res = train(cfg_for(setup, tmp_path / "run", max_steps=4, eval_steps=2), eval_callback=cb)
    recs = [json.loads(l) for l in res.log_path.read_text().splitlines()]
    assert seen == [2, 4] and [r["custom_metric"] for r in recs if "custom_metric" in r] == [2.0, 4.0]
