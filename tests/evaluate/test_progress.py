"""``evaluate`` says what it does on stderr: the plan, then probe fits counted with an ETA."""

from __future__ import annotations

import io

from healthfm.evaluate.progress import Progress, format_seconds, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_with_an_eta_and_silence_when_disabled(monkeypatch) -> None:
    out = io.StringIO()
    p = Progress("evaluate", stream=out, every_s=0.0)
    p.start(4, "plan: 2 methods × 2 seeds")
    assert p.eta() is None
    for i in range(4):
        p.update(note=f"m{i % 2}, seed {i // 2}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "evaluate: plan: 2 methods × 2 seeds"
    assert lines[1].startswith("evaluate: 1/4 fits (m0, seed 0), ") and "ETA" in lines[1]
    assert lines[-1].startswith("evaluate: 4/4 fits (m1, seed 1), ") and "ETA" not in lines[-1]
    assert p.eta() == 0.0

    quiet = io.StringIO()
    off = Progress(stream=quiet, enabled=False)
    off.say("x")
    off.start(2, "plan")
    off.update()
    assert quiet.getvalue() == "" and off.done == 1

    # Lines are spaced by every_s: only the last of many quick fits is printed.
    few = io.StringIO()
    slow = Progress(stream=few, every_s=3600.0)
    slow.start(50)
    for _ in range(50):
        slow.update()
    assert few.getvalue().splitlines() == [few.getvalue().splitlines()[-1]]
    assert "50/50 fits" in few.getvalue()

    monkeypatch.setenv("HEALTHFM_PROGRESS", "0")
    assert progress_enabled(None) is False and progress_enabled(True) is True
    monkeypatch.setenv("HEALTHFM_PROGRESS", "1")
    assert progress_enabled(None) is True
    assert format_seconds(42.2) == "42 s" and format_seconds(185) == "3 min 05 s"
    assert format_seconds(3720) == "1 h 02 min"


def test_a_bar_on_a_terminal() -> None:
    tty = _Tty()
    p = Progress("evaluate", stream=tty)
    p.start(3, "plan")
    assert p._bar is not None
    p.say("embedded m")  # written above the bar
    for _ in range(3):
        p.update(note="m")
    assert p._bar.n == 3 and p._bar.total == 3
    p.close()
    text = tty.getvalue()
    assert "evaluate: plan" in text and "evaluate: embedded m" in text and "0/3" in text


def test_evaluate_reports_plan_embeddings_and_fits(tmp_path, capsys) -> None:
    from healthfm.datasets import promoters
    from healthfm.stages.evaluate import evaluate
    from healthfm.stages.pretrain import pretrain
    from healthfm.train.trainer import TrainConfig

    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, checkpoint_every=2, warmup_steps=1)
    model = pretrain(
        "dna", promoters(), tmp_path / "m", {"label_column": "label"}, train_config=cfg
    )
    capsys.readouterr()
    opts = {"label_column": "label"}
    evaluate(model, promoters(), tmp_path / "e", opts, seeds=(0, 1), n_boot=10, echo=False)
    assert capsys.readouterr().err == ""  # silent: no echo (and HEALTHFM_PROGRESS=0 in tests)
    evaluate(
        model,
        promoters(),
        tmp_path / "e2",
        opts,
        seeds=(0, 1),
        n_boot=10,
        echo=False,
        progress=True,
        controls=False,
    )
    err = capsys.readouterr().err
    assert "evaluate: plan: " in err and "seeds [0, 1]" in err
    assert "evaluate: embedded tiny-" in err and "evaluate: baseline kmer-counts+logreg" in err
    assert "evaluate: probing 4 methods × 2 seeds = 8 fits" in err
    assert "evaluate: 8/8 fits" in err
