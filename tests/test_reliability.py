"""Issue 13: nothing a user does loses data, every mistake gets one clear line, ``--resume`` always resumes.

One test (often parametrised) per defect of the issue; the stage test files keep the older refusals.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clp_transfer.cli import SUBCOMMANDS, describe_failure
from clp_transfer.cli import main as cli
from clp_transfer.errors import ClpError

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32


def one_clear_line(err: str, *needles: str) -> None:
    """The CLI's contract for a user mistake: no traceback, one error line that says what to do."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], err


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "clp_transfer.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def pair(model_factory) -> tuple[str, str]:
    return str(model_factory("gpt2", "en", vocab=300, hidden=16)), str(model_factory("gpt2", "de", vocab=300,
                                                                                      hidden=16))


def copy_pair(pair, root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(pair[0], root / "src")), Path(shutil.copytree(pair[1], root / "hlp"))


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, model_factory, german_lines):
    from transformers import AutoTokenizer

    from test_train import write_shards

    model_dir = model_factory("gpt_neox", "de", tied=False, vocab=400, hidden=32)
    data = write_shards(tmp_path_factory.mktemp("data"), AutoTokenizer.from_pretrained(model_dir), german_lines)
    return model_dir, data


def train_cfg(train_setup, out: Path, **kw):
    from clp_transfer.train.loop import TrainConfig

    model_dir, data = train_setup
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), max_steps=6, block_size=BLOCK,
                per_device_train_batch_size=4, logging_steps=1, eval_steps=0, eval_batches=1,
                per_device_eval_batch_size=4, save_steps=2, save_total_limit=5, learning_rate=3e-3, min_lr=3e-4,
                warmup_ratio=0.25, report_to=["jsonl"], progress=False, seed=3, final_eval=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ data lost


def test_transfer_overwrite_refuses_an_output_that_holds_or_is_inside_the_inputs(tmp_path, pair, capsys):
    src, hlp = copy_pair(pair, tmp_path / "models")
    before = sorted(p.name for p in src.iterdir())
    code = cli(["transfer", "--source", str(src), "--helper", str(hlp), "--output", str(tmp_path / "models"),
                "--overwrite"])
    assert code == 2
    one_clear_line(capsys.readouterr().err, "contains the input")
    assert sorted(p.name for p in src.iterdir()) == before and (hlp / "model.safetensors").is_file()
    code = cli(["transfer", "--source", str(src), "--helper", str(hlp), "--output", str(src / "out"),
                "--overwrite"])
    assert code == 2
    one_clear_line(capsys.readouterr().err, "lies inside the input")
    assert not (src / "out").exists()


def test_prepare_overwrite_refuses_the_directory_holding_its_files(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "de.txt").write_text("eins zwei\ndrei vier\n" * 50, encoding="utf-8")
    for files in ([str(corpus / "de.txt")], [str(corpus)], [str(corpus / "*.txt")]):
        code = cli(["prepare", "--files", *files, "--output_dir", str(corpus), "--subsample_size_mb", "0.001",
                    "--overwrite"])
        assert code == 2
        one_clear_line(capsys.readouterr().err, "the input", "could destroy the input")
        assert (corpus / "de.txt").read_text(encoding="utf-8").startswith("eins zwei")


def test_train_overwrite_refuses_an_output_dir_holding_the_model(tmp_path, train_setup, capsys):
    model_dir, data = train_setup
    work = tmp_path / "work"
    model = Path(shutil.copytree(model_dir, work / "model"))
    code = cli(["train", "--model", str(model), "--data", str(data), "--output_dir", str(work), "--overwrite",
                "--max_steps", "1", "--block_size", str(BLOCK), "--no-progress"])
    assert code == 2
    one_clear_line(capsys.readouterr().err, "contains the input")
    assert (model / "model.safetensors").is_file()


HOLD_LOCK = """
import sys, time
from clp_transfer.atomic import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def lock_holder():
    """``hold(path)``: a separate process that holds the output lock of ``path``, as a running stage does."""
    procs = []

    def hold(path: Path, seconds: float = 120) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                             text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("stage", ["transfer", "train", "prepare"])
def test_a_second_run_on_a_busy_output_fails_fast(tmp_path, pair, train_setup, lock_holder, capsys, stage):
    out = tmp_path / "out"
    holder = lock_holder(out)
    if stage == "transfer":
        args = ["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(out)]
    elif stage == "train":
        model_dir, data = train_setup
        args = ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--max_steps", "1",
                "--no-progress"]
    else:
        (tmp_path / "de.txt").write_text("eins\nzwei\n", encoding="utf-8")
        args = ["prepare", "--files", str(tmp_path / "de.txt"), "--output_dir", str(out), "--subsample_size_mb", "1"]
    t0 = time.perf_counter()
    assert cli(args) == 2
    assert time.perf_counter() - t0 < 30
    one_clear_line(capsys.readouterr().err, "another run", f"pid {holder.pid}", "right now")
    assert not out.exists()


def test_the_lock_is_reentrant_waits_for_caches_and_leaves_no_file(tmp_path, lock_holder):
    from clp_transfer.atomic import atomic_directory, lock_path, output_lock

    out = tmp_path / "deep" / "out"
    with output_lock(out):
        with atomic_directory(out) as tmp:  # the stage's own atomic write shares the lock it holds
            (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1" and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    holder = lock_holder(tmp_path / "cache", seconds=2)
    t0 = time.perf_counter()
    with atomic_directory(tmp_path / "cache", overwrite=True, wait=True) as tmp:
        waited = time.perf_counter() - t0  # the lock comes only once the other writer is done (2 s)
        (tmp / "y").write_text("2")
    assert waited >= 1.5 and holder.wait(timeout=30) == 0
    assert not lock_path(tmp_path / "cache").exists()
    with output_lock(tmp_path / "a" / "b" / "c"):  # parents made for the lock are removed when nothing was written
        assert (tmp_path / "a" / "b").is_dir()
    assert not (tmp_path / "a").exists()


def test_two_concurrent_transfers_do_not_replace_each_other(tmp_path, pair, monkeypatch):
    """While one transfer computes, a second process on the same --output is refused (it used to succeed and
    silently replace the first one's model)."""
    import clp_transfer.transfer.embeddings as mod

    out = tmp_path / "out"
    seen = {}
    original = mod.compute_target_embeddings

    def second_run_meanwhile(*a, **k):
        if not seen:
            seen["run"] = run_cli("transfer", "--source", pair[0], "--helper", pair[1], "--output", str(out),
                                  "--method", "mean")
        return original(*a, **k)

    monkeypatch.setattr(mod, "compute_target_embeddings", second_run_meanwhile)
    assert cli(["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(out), "--method", "random"]) == 0
    assert seen["run"].returncode == 2
    one_clear_line(seen["run"].stderr, "another run", "right now")
    assert json.loads((out / "transfer_report.json").read_text())["method"] == "random"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no lock or temp left


@pytest.mark.parametrize("save_steps", [1, 2])
def test_nan_stop_names_only_a_checkpoint_with_finite_weights_and_validation_loss(tmp_path, train_setup,
                                                                                   save_steps):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from clp_transfer.data.shards import TokenShards
    from clp_transfer.train.loop import train

    model_dir, data = train_setup
    with pytest.raises(ClpError, match="loss became nan") as info:
        train(train_cfg(train_setup, tmp_path / "run", max_steps=20, save_steps=save_steps, learning_rate=1e12,
                        min_lr=0.0, max_grad_norm=0.0, warmup_ratio=0.0, eval_steps=0))
    valid = TokenShards(data, "valid")
    x = torch.from_numpy(valid.block(0, BLOCK).astype("int64"))[None]

    def val_loss(ck: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        weights = load_file(ck / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            return float(model.eval()(input_ids=x, labels=x).loss)

    message = str(info.value)
    named = [Path(w.rstrip(".,")) for w in message.split() if "step-" in w]
    for ck in named:
        assert torch.isfinite(torch.tensor(val_loss(ck))), message
    for ck in sorted((tmp_path / "run" / "checkpoints").glob("step-*")):
        assert torch.isfinite(torch.tensor(val_loss(ck))), ck
    if not named:
        assert "no checkpoint" in message


# ------------------------------------------------------------------------------------------- interrupted runs

PAUSED_TRANSFER = """
import sys, time
import clp_transfer.transfer.pipeline as mod
real = mod._write_config
def slow(*a, **k):
    real(*a, **k)
    print("writing", flush=True)
    time.sleep(120)
mod._write_config = slow
from clp_transfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def paused_transfer(pair, out: Path) -> subprocess.Popen:
    """A transfer that stops half-way through writing its output (the temporary directory exists)."""
    p = subprocess.Popen([sys.executable, "-c", PAUSED_TRANSFER, "transfer", "--source", pair[0], "--helper", pair[1],
                          "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    assert [d for d in out.parent.iterdir() if d.name.startswith(".out.tmp-")]
    return p


def test_sigterm_during_transfer_cleans_up_like_ctrl_c(tmp_path, pair):
    p = paused_transfer(pair, tmp_path / "out")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no temporary directory, no lock file, no output


def test_the_run_after_a_sigkill_removes_its_temporary_directory(tmp_path, pair, capsys):
    p = paused_transfer(pair, tmp_path / "out")
    p.kill()
    p.wait()
    left = [d.name for d in tmp_path.iterdir()]
    assert any(n.startswith(".out.tmp-") for n in left)  # SIGKILL allows no cleanup
    assert cli(["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(tmp_path / "out")]) == 0
    assert sorted(d.name for d in tmp_path.iterdir()) == ["out"]


KILLED_PARENT = """
import multiprocessing, os, signal, sys, time
from clp_transfer.data.encode import die_with_parent

def child(parent):
    die_with_parent(parent)
    time.sleep(120)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(float(sys.argv[1]))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks /proc")
def test_prepare_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), "3"], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    child = int(parent.stdout.readline())
    parent.wait(timeout=60)
    assert parent.returncode == -9
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the worker outlived its SIGKILLed parent"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.split(")")[-1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.slow  # ~15-20 s on 2 busy cores; test_prepare_workers_die_with_a_killed_parent is the fast check
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks /proc")
def test_sigkilled_prepare_leaves_no_worker_processes(tmp_path, german_lines):
    from clp_transfer.tiny import train_tokenizer

    train_tokenizer(german_lines, 400, "bpe").save_pretrained(tmp_path / "tok")
    text = tmp_path / "big.txt"
    with open(text, "w", encoding="utf-8") as f:
        for i in range(4000):  # a few MB of varied lines: the run outlasts the workers' start-up
            f.write(" ".join(f"{w}{i % 97}{j}" for j, w in enumerate(german_lines[i % len(german_lines)].split())))
            f.write("\n" + german_lines[i % len(german_lines)] * 8 + "\n")
    p = subprocess.Popen([sys.executable, "-m", "clp_transfer.cli", "prepare", "--files", str(text), "--output_dir",
                          str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"), "--subsample_size_mb", "9",
                          "--num_proc", "2", "--parallelism", "processes", "--no-progress"],
                         env=dict(os.environ, PYTHONPATH=str(REPO / "src")), stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline:
        workers = [c for c in _children(p.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="ignore")]
        if len(workers) >= 2:
            break
        time.sleep(0.05)
    assert len(workers) >= 2 and p.poll() is None, "the prepare run ended before its workers were seen"
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if _alive(w)]
    for w in orphans:  # do not leave them running when the test fails
        os.kill(w, signal.SIGKILL)
    assert not orphans, "prepare's workers outlived their SIGKILLed parent"


def test_prepare_process_pool_workers_are_told_their_parent(monkeypatch):
    """prepare's process pool passes its pid to the worker initializer (which arms die_with_parent)."""
    import clp_transfer.data.pipeline as prep

    seen = {}

    class FakePool:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", FakePool)
    prep._ChunkRunner(spec=None, num_proc=2, mode="processes")
    assert seen["initargs"][1] == os.getpid()


def test_resume_with_the_identical_command_resumes_when_block_size_was_not_given(tmp_path, train_setup):
    from clp_transfer.train.loop import train

    cfg = train_cfg(train_setup, tmp_path / "run", block_size=None, max_steps=4, save_steps=2)
    train(cfg)
    saved = (tmp_path / "run" / "run_config.yaml").read_text()
    assert "block_size: 32" in saved  # resolved from the data (32 there) when it was not given
    half_written = tmp_path / "run" / "checkpoints" / ".step-000004.tmp"  # from a run killed while saving
    half_written.mkdir()
    res = train(train_cfg(train_setup, tmp_path / "run", block_size=None, max_steps=4, save_steps=2, resume=True))
    assert res.resumed_from == 2 and not half_written.exists()
    with pytest.raises(ClpError, match="block_size: 32 -> 16"):  # a really different block size is refused
        train(train_cfg(train_setup, tmp_path / "run", block_size=16, max_steps=4, save_steps=2, resume=True))


# ------------------------------------------------------------------------------- one clear line, no traceback


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"clp-transfer {command}" in out and "--debug" in out


@pytest.mark.parametrize("script", [["prepare.py", "--help"], ["clp.py", "--help"], ["clp.py", "apply_clp", "--help"]])
def test_help_of_the_seed_scripts(script):
    run = subprocess.run([sys.executable, str(REPO / script[0]), *script[1:]], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "src")), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout and "Traceback" not in run.stderr


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_source_weights_are_named(tmp_path, pair, capsys):
    src, hlp = copy_pair(pair, tmp_path / "m")
    truncate(src / "model.safetensors")
    assert cli(["transfer", "--source", str(src), "--helper", str(hlp), "--output", str(tmp_path / "out")]) == 2
    one_clear_line(capsys.readouterr().err, str(src / "model.safetensors"), "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin"])
def test_resume_skips_a_truncated_checkpoint_or_names_the_file(tmp_path, train_setup, damaged, caplog):
    from clp_transfer.train.loop import train

    train(train_cfg(train_setup, tmp_path / "run", max_steps=5, save_steps=2))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    truncate(ckpts / "step-000004" / damaged)
    with caplog.at_level("WARNING"):
        res = train(train_cfg(train_setup, tmp_path / "run", max_steps=5, save_steps=2, resume=True))
    assert res.resumed_from == 2
    assert any("step-000004" in r.getMessage() and damaged in r.getMessage() for r in caplog.records)
    # every checkpoint damaged: a clear error naming the file, no silent garbage
    for ck in ckpts.glob("step-*"):
        truncate(ck / damaged)
    with pytest.raises(ClpError, match=f"no intact checkpoint.*step-00000[24]/{damaged}"):
        train(train_cfg(train_setup, tmp_path / "run", max_steps=5, save_steps=2, resume=True))


def latin1_file(path: Path) -> Path:
    path.write_bytes("Grüße aus Köln, schöne Straße\n".encode("latin-1") * 20)
    return path


@pytest.mark.parametrize("where", ["calibration_text", "perplexity", "compare"])
def test_non_utf8_text_gets_one_line(tmp_path, pair, capsys, where):
    bad = latin1_file(tmp_path / ("bad.json" if where == "compare" else "bad.txt"))
    if where == "calibration_text":
        args = ["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(tmp_path / "out"),
                "--calibration_text", str(bad)]
    elif where == "perplexity":
        args = ["perplexity", "--model", pair[1], "--text_files", str(bad)]
    else:
        args = ["compare", str(bad)]
    assert cli(args) == 2
    one_clear_line(capsys.readouterr().err, str(bad), "UTF-8")
    assert not (tmp_path / "out").exists()


def test_output_whose_parent_is_a_file(tmp_path, pair, capsys):
    (tmp_path / "file.txt").write_text("mine")
    for out in (tmp_path / "file.txt" / "out", tmp_path / "file.txt" / "a" / "b"):
        assert cli(["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(out)]) == 2
        one_clear_line(capsys.readouterr().err, "is a file")
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_output_without_write_permission(tmp_path, pair, capsys, monkeypatch):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root may write anywhere: show the check the view of an ordinary user
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == locked else real(p, m))
        assert cli(["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(locked / "out")]) == 2
        one_clear_line(capsys.readouterr().err, "no write permission", str(locked))
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("exc, needle", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/out"), "Permission denied: '/x/out'; check the permissions"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/out"), "is a file, not a directory"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
    (FileNotFoundError("No such file or directory: /m/model.safetensors"), "deleted while the run"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "UTF-8"),
    (ValueError("... contains custom code ... pass `trust_remote_code=True`"), "--trust_remote_code"),
    (json.JSONDecodeError("Expecting value", "", 0), "JSON file is corrupt"),
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"), "torch zip"),
])
def test_expected_failures_become_one_actionable_line(exc, needle):
    message = describe_failure(exc)
    assert message is not None and needle in message and "\n" not in message


def test_a_real_bug_keeps_its_traceback_and_debug_shows_tracebacks(tmp_path, pair, monkeypatch, capsys):
    import clp_transfer.transfer.pipeline as mod

    assert describe_failure(RuntimeError("index out of range")) is None
    monkeypatch.setattr(mod, "_write_config", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli(["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    args = ["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(tmp_path / "o"), "--method", "clpp"]
    assert cli(args) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "did you mean 'clp'" in err
    monkeypatch.setenv("CLP_TRANSFER_DEBUG", "1")
    assert cli(args) == 2
    assert "Traceback" in capsys.readouterr().err


REMOTE_CONFIG = "from transformers import GPT2Config\nclass MyConfig(GPT2Config):\n    model_type = 'my_gpt'\n"
REMOTE_MODEL = ("from transformers import GPT2LMHeadModel\nfrom .configuration_my import MyConfig\n"
                "class MyModel(GPT2LMHeadModel):\n    config_class = MyConfig\n")


def test_a_source_that_needs_remote_code_names_our_flag(tmp_path, pair, capsys):
    src = Path(shutil.copytree(pair[0], tmp_path / "custom"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "my_gpt"
    cfg["auto_map"] = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "configuration_my.py").write_text(REMOTE_CONFIG)
    (src / "modeling_my.py").write_text(REMOTE_MODEL)
    assert cli(["transfer", "--source", str(src), "--helper", pair[1], "--output", str(tmp_path / "out")]) == 2
    one_clear_line(capsys.readouterr().err, "--trust_remote_code")
    assert not (tmp_path / "out").exists()


def test_a_source_deleted_while_it_is_read(tmp_path, pair, capsys, monkeypatch):
    from clp_transfer.models import SafetensorsCheckpoint

    src, hlp = copy_pair(pair, tmp_path / "m")
    original = SafetensorsCheckpoint.get

    def vanish(self, key):
        if self.path == src:
            shutil.rmtree(src)
        return original(self, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "get", vanish)
    assert cli(["transfer", "--source", str(src), "--helper", str(hlp), "--output", str(tmp_path / "out")]) == 2
    one_clear_line(capsys.readouterr().err, "model.safetensors", "deleted while the run")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("param, needle", [
    ("temperature=nan", "temperature must be a finite number"),
    ("temperature=inf", "temperature must be a finite number"),
    ("temperature=0", "temperature must be > 0"),
    ("top_k=-5", "top_k must be >= 1"),
    ("pieces_weight=2", "pieces_weight must lie in [0, 1]"),
    ("calibrate=-1", "calibrate must be >= 0"),
    ("weighting=softmax", "weighting must be one of"),
    ("auto:margin=-1", "margin must be >= 0"),
    ("auto:check_tokens=0", "check_tokens must be >= 1"),
    ("auto:pieces_weights=a,b", "pieces_weights takes comma-separated numbers"),
])
def test_method_parameters_are_checked_before_any_work(tmp_path, pair, capsys, param, needle):
    method, _, param = param.rpartition(":")
    assert cli(["transfer", "--source", pair[0], "--helper", pair[1], "--output", str(tmp_path / "out"),
                "--method", method or "clp", "--params", param]) == 2
    one_clear_line(capsys.readouterr().err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (["transfer", "--pad_to_multiple_of", "-8"], "--pad_to_multiple_of must be a positive"),
    (["transfer", "--pad_to_multiple_of", "0"], "--pad_to_multiple_of must be a positive"),
    (["transfer", "--calibration_tokens", "0"], "--calibration_tokens must be positive"),
    (["evaluate", "--tasks", "x", "--limit", "-1"], "--limit must be a positive"),
    (["evaluate", "--tasks", "x", "--limit", "nan"], "--limit must be a finite number"),
    (["evaluate", "--tasks", "x", "--batch_size", "0"], "--batch_size must be at least 1"),
    (["train", "--learning_rate", "nan"], "--learning_rate must be a finite number"),
])
def test_bad_numbers_in_flags_name_the_flag(tmp_path, pair, capsys, args, needle):
    command, extra = args[0], args[1:]
    if command == "transfer":
        full = [command, "--source", pair[0], "--helper", pair[1], "--output", str(tmp_path / "out"), *extra]
    elif command == "evaluate":
        full = [command, "--model", pair[1], *extra]
    else:
        full = [command, "--model", pair[1], "--data", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra]
    assert cli(full) == 2
    one_clear_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


def test_compare_on_results_without_values_fails(tmp_path, capsys):
    empty = tmp_path / "results.json"
    empty.write_text(json.dumps({"results": {}, "config": {"model": "m"}}))
    assert cli(["compare", str(empty)]) == 2
    one_clear_line(capsys.readouterr().err, "no metric values")
