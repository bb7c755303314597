"""The report's one sentence per model: against the strongest baseline, and what
pretraining bought (model − untrained control); the control rows are not verdicts."""

from __future__ import annotations

from healthfm.report.build import summary_lines


def _delta(model: str, value: float, lo: float, hi: float, verdict: str, control: bool) -> dict:
    return {
        "row_type": "delta",
        "primary": True,
        "reference_kind": "strongest baseline",
        "model": model,
        "reference": "onehot-cnn+logreg",
        "metric": "macro_f1",
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "verdict": verdict,
        "control": control,
    }


def test_summary_says_baseline_and_what_pretraining_bought() -> None:
    deltas = [
        _delta("tiny-mean+logreg", -0.371, -0.431, -0.325, "baseline better", False),
        _delta("tiny-untrained-mean+logreg", -0.336, -0.379, -0.299, "baseline better", True),
        _delta("tiny-mean⊕one-hot+logreg", -0.016, -0.038, 0.008, "no difference shown", True),
        {**_delta("tiny-mean+logreg", 0.1, 0.0, 0.2, "model better", False), "primary": False},
    ]
    lines = summary_lines(deltas)
    assert len(lines) == 1  # one model; the controls and secondary metrics make no sentence
    line = lines[0]
    assert line.startswith("tiny-mean+logreg trails the strongest baseline, onehot-cnn+logreg:")
    assert "−0.371 [−0.431, −0.325] (baseline better)" in line
    assert "pretraining bought −0.035" in line and "(tiny-untrained-mean+logreg)" in line
    better = summary_lines([_delta("m-cls+logreg", 0.05, 0.01, 0.09, "model better", False)])
    assert better == [
        "m-cls+logreg beats the strongest baseline, onehot-cnn+logreg: macro-F1 0.050 "
        "[0.010, 0.090] (model better)."
    ]
