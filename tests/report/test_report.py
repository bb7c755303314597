"""The HTML report of a small real run, looked at in headless Chromium, and bad input.

The run: a tiny DNA model pretrained for a few steps on the bundled promoter sequences,
evaluated next to the k-mer and one-hot baselines (2 seeds). The browser check renders a
copy of the page with a recorder script (the page itself allows no script) that notes
errors, Content-Security-Policy violations (any request the page tried), resource loads
and every image's natural width, and reads them back with ``--dump-dom``; a screenshot of
the real page is kept as a test artefact (``$HEALTHFM_TEST_ARTIFACTS`` or
``test-artifacts/``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from browser import chromium_or_skip, run_browser
from healthfm.cli import main
from healthfm.datasets import promoters
from healthfm.errors import DataError
from healthfm.report import render_report

FAST = ["--steps", "6", "--batch-size", "16", "--eval-every", "3", "--checkpoint-every", "3"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    model = base / "model"
    assert main(["pretrain", "dna", str(promoters()), "--out", str(model), *FAST]) == 0
    out = base / "eval"
    code = main(
        [
            "evaluate",
            str(model),
            str(promoters()),
            "--label-column",
            "label",
            "--out",
            str(out),
            "--seeds",
            "0",
            "1",
            "--n-boot",
            "100",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def chromium():
    """The chromium binary (tests/browser.py); skipped only if it cannot be installed."""
    return chromium_or_skip()


RECORDER = """<script>
window.__problems = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  __problems.push('error: ' + (e.message || t.src || t.href || 'unknown'));
}, true);
document.addEventListener('securitypolicyviolation', function (e) {
  __problems.push('blocked request: ' + e.blockedURI + ' (' + e.violatedDirective + ')');
});
var __err = console.error;
console.error = function () {
  __problems.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  __err.apply(console, arguments);
};
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, width: i.naturalWidth, complete: i.complete};
  });
  var loads = performance.getEntriesByType('resource').map(function (r) { return r.name; });
  var pre = document.createElement('pre');
  pre.id = '__check';
  pre.textContent = JSON.stringify({
    problems: __problems, images: images, loads: loads,
    verdicts: document.querySelectorAll('.verdict').length,
    results_rows: document.querySelectorAll('table.results tbody tr').length,
    title: document.title
  });
  document.body.appendChild(pre);
});
</script>"""


def _check_page(exe: str, page: Path, tmp: Path) -> dict:
    """Load a copy of ``page`` with the recorder; what it saw."""
    text = page.read_text()
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert f'content="{csp}"' in text  # the page itself allows no script, no request
    # The copy allows exactly one more thing: the recorder's inline script.
    copy = text.replace(csp, csp + "; script-src 'unsafe-inline'").replace(
        "<head>", "<head>" + RECORDER, 1
    )
    probe = tmp / "check.html"
    probe.write_text(copy)
    proc = run_browser(
        exe, tmp / "profile-check", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()
    )
    found = re.search(r'<pre id="__check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no recorder output; chromium said: {proc.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [
        line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
    ]
    return result


def test_evaluate_writes_delta_rows_inputs_and_the_report(run_dir, capsys):
    rows = json.loads((run_dir / "results.json").read_text())
    deltas = [r for r in rows if r.get("row_type") == "delta"]
    assert deltas and all(" − " in r["method"] and r["reference"] in r["method"] for r in deltas)
    primary = [r for r in deltas if r["primary"] and not r.get("control")]
    assert [r["metric"] for r in primary] == ["auroc"]  # a binary task
    # The controls (untrained architecture, model ⊕ baseline) get their own comparisons.
    assert len([r for r in deltas if r["primary"] and r.get("control")]) == 2
    assert primary[0]["verdict"] in ("model better", "no difference shown", "baseline better")
    assert primary[0]["seeds_model"] == [0, 1] and primary[0]["n_boot"] == 100
    # Every difference is the seed-averaged method rows' values, subtracted.
    scores = [r for r in rows if r.get("row_type") != "delta"]
    for d in deltas:
        mean = {
            m: sum(r["value"] for r in scores if r["method"] == m and r["metric"] == d["metric"])
            / 2
            for m in (d["model"], d["reference"])
        }
        assert d["value"] == pytest.approx(mean[d["model"]] - mean[d["reference"]], abs=1e-12)
    for name in ("report.html", "report_inputs.json", "report_inputs.npz"):
        assert (run_dir / name).is_file()
    meta = json.loads((run_dir / "report_inputs.json").read_text())
    assert meta["map_method"] == "pca" and meta["provenance"]["seeds"] == [0, 1]


def test_report_in_headless_chromium(run_dir, chromium, tmp_path):
    page = run_dir / "report.html"
    text = page.read_text()
    # No URL the browser could fetch: every src is inline data, every href an anchor.
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', text):
        assert value.startswith(("data:", "#")), (attr, value[:80])
    assert not re.search(r"url\((?!data:)", text) and "@import" not in text

    seen = _check_page(chromium, page, tmp_path)
    assert seen["problems"] == [], seen["problems"]
    assert seen["console"] == [], seen["console"]
    assert seen["loads"] == []  # no resource fetched at all (data: images are not fetches)
    assert len(seen["images"]) >= 5
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    # The model, its two controls and the three baselines (k-mer counts, one-hot, CNN).
    assert seen["verdicts"] >= 1 and seen["results_rows"] == 6
    assert "promoters:label" in seen["title"]

    # The unmodified page: no console message either, and a screenshot as an artefact.
    artefacts = Path(os.environ.get("HEALTHFM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "report_dna_small.png"
    proc = run_browser(
        chromium,
        tmp_path / "profile-shot",
        "--window-size=1280,2400",
        "--virtual-time-budget=10000",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert [line for line in proc.stderr.splitlines() if "CONSOLE" in line] == []
    import numpy as np
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank page


def test_report_command_prints_verdicts(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "promoters:label: " in printed and " − " in printed and "→" in printed
    assert f"wrote {out}" in printed
    page = out.read_text()
    assert "Paired differences" in page and "Provenance" in page and "Pretraining loss" in page


def test_run_folder_without_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "no results.json" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_truncated_results_json_is_a_clear_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (run_dir / "results.json").read_text()
    (bad / "results.json").write_text(text[: len(text) // 2])
    assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "truncated" in err and "results.json" in err
    (bad / "results.json").write_text('{"task": 1}')
    with pytest.raises(DataError, match="JSON list"):
        render_report([bad], tmp_path / "r.html")
    (bad / "results.json").write_text('[{"task": "t", "method": "m"}]')
    with pytest.raises(DataError, match="is_baseline"):
        render_report([bad], tmp_path / "r.html")
    # A damaged arrays file of an otherwise good run.
    shutil.copytree(run_dir, tmp_path / "npz")
    (tmp_path / "npz" / "report_inputs.npz").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(DataError, match="report arrays"):
        render_report([tmp_path / "npz"], tmp_path / "r.html")


def test_two_data_hashes_are_labelled_with_a_visible_warning(run_dir, tmp_path, chromium, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    rows = json.loads((other / "results.json").read_text())
    for r in rows:
        r["data_hash"] = "0" * 64
    (other / "results.json").write_text(json.dumps(rows))
    out = tmp_path / "mixed.html"
    assert main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: Task 'promoters:label' was evaluated on 2 different data sets" in printed
    page = out.read_text()
    assert page.count('class="warning"') == 1 and "do not compare their numbers" in page
    assert "0000000000000000" in page  # each section names its data hash
    seen = _check_page(chromium, out, tmp_path)
    assert seen["problems"] == [] and seen["verdicts"] >= 2

    # Rows of two data sets inside one results.json: labelled too.
    merged = tmp_path / "merged"
    merged.mkdir()
    good = json.loads((run_dir / "results.json").read_text())
    (merged / "results.json").write_text(json.dumps(good + rows))
    render_report([merged], tmp_path / "m.html")
    assert "come from 2 different data sets" in (tmp_path / "m.html").read_text()


def test_an_older_run_without_report_inputs_still_renders(run_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    rows = [
        r
        for r in json.loads((run_dir / "results.json").read_text())
        if r.get("row_type") != "delta"
    ]
    (old / "results.json").write_text(json.dumps(rows))
    page = render_report([old], tmp_path / "o.html").read_text()
    assert "No paired comparison in this run" in page and "No report_inputs.json" in page


def test_a_knn_rows_k_is_not_a_few_shot_size(run_dir, tmp_path):
    # Single-cell k-NN rows carry k = 15 neighbours; the verdict must still be shown.
    knn = tmp_path / "knn"
    knn.mkdir()
    rows = json.loads((run_dir / "results.json").read_text())
    extra = [
        {**r, "method": r["method"].replace("+logreg", "+knn15"), "k": 15}
        for r in rows
        if r.get("row_type") != "delta"
    ]
    (knn / "results.json").write_text(json.dumps(rows + extra))
    page = render_report([knn], tmp_path / "k.html").read_text()
    assert 'data-verdict="' in page and "+knn15" in page and "Few-shot" not in page
