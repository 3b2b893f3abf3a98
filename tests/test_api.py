"""The public in-memory API: ``from clp_transfer import transfer_embeddings`` and the README's example."""

import re
from pathlib import Path

import torch

import clp_transfer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_tensor_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("### On tensors: `transfer_embeddings`", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    return code


def test_the_readme_example_on_tensors_runs():
    code = readme_tensor_example()
    assert "from clp_transfer import transfer_embeddings" in code
    exec(compile(code, str(README), "exec"), {})


def test_public_api_is_exported():
    from clp_transfer import EmbeddingReport, TransferredEmbeddings, run_transfer, transfer_embeddings  # noqa: F401

    for name in clp_transfer.__all__:
        assert getattr(clp_transfer, name) is not None


def test_transfer_embeddings_matches_the_methods_on_a_problem_built_by_hand():
    from clp_transfer import EmbeddingProblem, compute_target_embeddings, transfer_embeddings

    src = {"Ġa": 0, "Ġb": 1, "Ġc": 2, "Ġd": 3}
    tgt = {"Ġb": 0, "Ġx": 1, "Ġd": 2, "Ġy": 3, "Ġa": 4}
    e_s, o_s, e_h = torch.randn(4, 6), torch.randn(4, 6), torch.randn(5, 3)
    result = transfer_embeddings(e_s, e_h, src, tgt, source_output=o_s, method="clp", params={"calibrate": 0}, seed=3)
    by_hand = compute_target_embeddings(
        EmbeddingProblem(e_s, torch.tensor([1, -1, 3, -1, 0]), 5, source_output=o_s, helper_input=e_h),
        "clp", {"calibrate": 0}, seed=3)
    assert torch.equal(result.input, by_hand.input) and torch.equal(result.output, by_hand.output)
    assert result.report.new_token_ids == [1, 3] and result.report.matching["shared"] == 3
    assert result.report.to_dict()["params"]["calibrate"] == 0


def test_calibration_is_one_step_after_the_rows():
    """A calibration function sees the uncalibrated input rows, and the result equals solving a problem that
    carries the statistics from the start (the old double solve)."""
    import dataclasses

    from clp_transfer import CalibrationStats, build_problem, compute_target_embeddings, transfer_embeddings

    src = {"Ġa": 0, "Ġb": 1, "Ġc": 2, "Ġd": 3}
    tgt = {"Ġb": 0, "Ġx": 1, "Ġd": 2, "Ġy": 3, "Ġa": 4}
    e_s, e_h = torch.randn(4, 6), torch.randn(5, 3)
    hidden, counts = torch.randn(20, 6), torch.arange(5).float()
    seen = []

    def measure(rows):
        seen.append(rows.clone())
        return CalibrationStats(hidden, counts)

    result = transfer_embeddings(e_s, e_h, src, tgt, calibration=measure)
    task = build_problem(e_s, e_h, src, tgt)
    plain = compute_target_embeddings(task.problem, "clp")
    full = compute_target_embeddings(dataclasses.replace(task.problem, calibration_hidden=hidden,
                                                         token_counts=counts), "clp")
    assert len(seen) == 1 and torch.equal(seen[0], plain.input)
    assert torch.equal(result.input, full.input)
    assert result.report.new_rows["calibration"]["applied"] is True
    assert result.report.new_rows == {k: v for k, v in full.stats.items() if k not in ("params", "method")}
