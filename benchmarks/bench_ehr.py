"""EHR benchmarks: MEDS tokenization speed / memory, and prediction-time embedding speed.

Usage::

    .venv/bin/python benchmarks/bench_ehr.py [--subjects 8000] [--out bench_out/ehr]
        [--femr-python /tmp/femrvenv/bin/python]

1. Tokenization: events/s and peak RSS of healthfm's MEDS tokenizer (fit on train + encode
   every shard, straight from the parquet shards), each measured in a fresh subprocess on
   the same synthetic MEDS folder, and the encoding alone in another fresh process (the
   fitted tokenizer loaded from JSON); and, when ``--femr-python`` points at an
   environment with ``femr`` and ``meds_reader`` installed (femr pins an older ``meds``,
   so it cannot share our venv), FEMR's ``meds_reader`` conversion + a full pass over
   every event, and FEMR's tokenizer (train + ``convert_subject`` for every subject).
2. Embedding: labels/s of the one-pass-per-subject path vs re-encoding each label's
   history separately (one forward row per label, length-sorted padded batches), on
   subjects with at least 5 labels, with the same model; both give the same embeddings
   (the maximum relative difference is reported). Wall and CPU time (one torch thread)
   of the embedding alone, best of three (interleaved, after a warm-up), and the ratio
   of tokens forwarded (the ceiling of the saving: re-encoding forwards each label's
   prefix, on average about half the history).

Memory, like with like: peak RSS is the Linux high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after imports), reported over the RSS after imports, for the
fit and the encoding phases (the mark is reset in between; the encoding peak still
counts what the fit left resident). FEMR's numbers are measured the same way in its own
process, *after* ``meds_reader_convert`` has turned the MEDS parquet into its database
in a separate process (whose own peak RSS is reported, not added); ours include reading
and validating the parquet shards. RSS includes allocator caches (polars' jemalloc,
arrow's mimalloc keep freed pages for a while) and library code paged in on first use.

Numbers are ratios measured in one run on a shared machine; the absolute rates vary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status(field: str) -> float:
    # VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> float:
    """Reset the peak-RSS mark (Linux clear_refs) after imports; return the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def worker_healthfm(meds_dir: str, tokenizer_json: str | None = None) -> dict:
    """Fit the tokenizer on train, encode every shard; report events/s and peak RSS.

    Peak RSS is measured over the RSS after imports and opening the folder, for the fit
    and the encoding phase separately (the mark is reset between them, so the encoding
    peak still counts what the fit left resident). With ``tokenizer_json`` (a fitted
    tokenizer's config) there is no fit: this fresh process only encodes.
    """
    from healthfm.ehr import open_meds
    from healthfm.ehr.tokenizer import MedsTokenizer

    ds = open_meds(meds_dir)
    train = np.array([s for s, sp in ds.splits.items() if sp == "train"])
    out: dict = {"tool": "healthfm"}
    if tokenizer_json:
        tok = MedsTokenizer.from_config(json.loads(Path(tokenizer_json).read_text()))
        base = _reset_peak()
        t_fit, peak_fit = 0.0, 0.0
    else:
        base = _reset_peak()
        t0 = time.perf_counter()
        tok = MedsTokenizer.fit(ds, train)
        t_fit = time.perf_counter() - t0
        peak_fit = _status("VmHWM") - base
        _reset_peak()
    t1 = time.perf_counter()
    n_events = n_tokens = 0
    for enc in tok.encode_dataset(ds):
        n_events += enc.n_events
        n_tokens += len(enc.ids)
    t_enc = time.perf_counter() - t1
    peak_enc = _status("VmHWM") - base
    out.update(
        events=n_events,
        tokens=n_tokens,
        fit_s=t_fit,
        encode_s=t_enc,
        events_per_s=n_events / t_enc,
        events_per_s_incl_fit=n_events / (t_fit + t_enc),
        rss_after_imports_mb=base,
        peak_over_imports_mb=max(peak_fit, peak_enc),
        peak_fit_over_imports_mb=peak_fit,
        peak_encode_over_imports_mb=peak_enc,
        peak_rss_mb=base + max(peak_fit, peak_enc),
    )
    if not tokenizer_json:
        path = Path(tempfile.mkdtemp()) / "tokenizer.json"
        path.write_text(json.dumps(tok.config()))
        out["tokenizer_json"] = str(path)
    return out


FEMR_WORKER = r"""
import json, os, resource, subprocess, sys, tempfile, time
meds_dir = sys.argv[1]
out = {"tool": "femr"}
t0 = time.perf_counter()
db_path = os.path.join(tempfile.mkdtemp(), "db")
convert = os.path.join(os.path.dirname(sys.executable), "meds_reader_convert")
convert = convert if os.path.exists(convert) else "meds_reader_convert"  # else from PATH
subprocess.run([convert, meds_dir, db_path, "--num_threads", "1"], check=True, capture_output=True)
out["meds_reader_convert_s"] = time.perf_counter() - t0
out["convert_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
import meds_reader
import femr.models.processor as fp
import femr.models.tokenizer.hierarchical_tokenizer as ht
import femr.ontology
def _status(field):
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on (imports excluded)
out["rss_after_imports_mb"] = _status("VmRSS")

with meds_reader.SubjectDatabase(db_path, num_threads=1) as db:
    t1 = time.perf_counter()
    n = 0
    for sid in db:
        for _event in db[sid].events:
            n += 1
    out["meds_reader_full_pass_s"] = time.perf_counter() - t1
    out["events"] = n
    out["meds_reader_events_per_s"] = n / out["meds_reader_full_pass_s"]
    # FEMR's tokenizer needs an Athena ontology; an empty one (headers only) plus the MEDS
    # codes.parquet, as FEMR's own tests do (flat_tokenizer.train_tokenizer is broken in 0.2.4).
    athena = tempfile.mkdtemp()
    for name, cols in (("CONCEPT.csv", "concept_id\tconcept_name\tvocabulary_id\tconcept_code\tstandard_concept"),
                       ("CONCEPT_RELATIONSHIP.csv", "concept_id_1\tconcept_id_2\trelationship_id"),
                       ("CONCEPT_ANCESTOR.csv", "ancestor_concept_id\tdescendant_concept_id\tmin_levels_of_separation")):
        with open(os.path.join(athena, name), "w") as f:
            f.write(cols + "\n")
    t2 = time.perf_counter()
    ontology = femr.ontology.Ontology(athena, os.path.join(meds_dir, "metadata", "codes.parquet"))
    tok = ht.HierarchicalTokenizer.train(db, vocab_size=4096, ontology=ontology)
    out["fit_s"] = time.perf_counter() - t2
    out["peak_fit_over_imports_mb"] = _status("VmHWM") - out["rss_after_imports_mb"]
    open("/proc/self/clear_refs", "w").write("5")
    proc = fp.FEMRBatchProcessor(tok)
    t3 = time.perf_counter()
    for sid in db:
        proc.convert_subject(db[sid])
    out["encode_s"] = time.perf_counter() - t3
    out["peak_encode_over_imports_mb"] = _status("VmHWM") - out["rss_after_imports_mb"]
    out["events_per_s"] = n / out["encode_s"]
    out["events_per_s_incl_fit"] = n / (out["fit_s"] + out["encode_s"])
    try:  # FEMR's batched path (Hugging Face datasets), its recommended way
        t4 = time.perf_counter()
        proc.convert_dataset(db, tokens_per_batch=8192, num_proc=1)
        out["convert_dataset_s"] = time.perf_counter() - t4
        out["convert_dataset_events_per_s"] = n / out["convert_dataset_s"]
    except Exception as exc:  # reported, not hidden
        out["convert_dataset_error"] = f"{type(exc).__name__}: {exc}"[:300]
out["peak_over_imports_mb"] = max(
    out["peak_fit_over_imports_mb"], _status("VmHWM") - out["rss_after_imports_mb"]
)
out["peak_rss_mb"] = out["rss_after_imports_mb"] + out["peak_over_imports_mb"]
print(json.dumps(out))
"""


def _run_worker(args: list[str]) -> dict:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_embedding(
    meds_dir: Path, batch_size: int = 32, max_subjects: int = 150, repeats: int = 3
) -> dict:
    """labels/s: one forward pass per subject vs one per label (same model, same labels).

    Two label sets on the same subjects: the task's labels (subjects with >= 5), and one
    prediction time at 23:59 of every day with an event (as when scoring every visit).
    """
    import polars as pl
    import torch

    from healthfm.ehr import open_meds, read_labels, scan_meds
    from healthfm.ehr.embed import _plan_rows, embed_cutoffs, label_cutoffs
    from healthfm.ehr.reader import iter_batches, iter_shards
    from healthfm.ehr.tokenizer import MedsTokenizer
    from healthfm.model import FoundationModel, ModelConfig

    torch.manual_seed(0)
    ds = open_meds(meds_dir)
    subjects = scan_meds(ds)
    lab = pl.read_parquet(meds_dir / "task_labels" / "admission_1y" / "labels.parquet")
    many = (
        lab.group_by("subject_id")
        .len()
        .filter(pl.col("len") >= 5)["subject_id"]
        .sort()
        .head(max_subjects)
    )
    tmp = Path(tempfile.mkdtemp())
    lab.filter(pl.col("subject_id").is_in(many.implode())).write_parquet(tmp / "task.parquet")
    days = (
        pl.concat(
            [
                df.filter(pl.col("time").is_not_null()).select(
                    "subject_id", pl.col("time").dt.truncate("1d")
                )
                for _, df in iter_shards(ds, many.to_numpy())
            ]
        )
        .unique()
        .select(
            "subject_id",
            (pl.col("time") + pl.duration(hours=23, minutes=59)).alias("prediction_time"),
        )
    )
    days.with_columns(pl.lit(False).alias("boolean_value")).write_parquet(tmp / "days.parquet")
    train = np.array([s for s, sp in ds.splits.items() if sp == "train"])
    tok = MedsTokenizer.fit(ds, train)
    cfg = ModelConfig.from_preset(
        "tiny",
        modality="ehr",
        vocab_size=tok.vocab_size,
        objective="causal",
        use_times=True,
        max_len=256,
        pooling="last",
    )
    model = FoundationModel(cfg).eval()
    out: dict = {}
    for name in ("task", "days"):
        labels = read_labels(tmp / f"{name}.parquet", subjects)
        r: dict = {"labels": len(labels), "subjects": int(labels.frame["subject_id"].n_unique())}
        r["labels_per_subject"] = r["labels"] / r["subjects"]
        # Tokenize the labelled subjects as featurize_labels does, then time the embedding
        # alone: wall and CPU time (one torch thread, so CPU time is robust to a loaded
        # machine), best of `repeats`.
        parts = []
        for _, df in iter_batches(ds, np.unique(labels.subject_ids)):
            enc = tok.encode_frame(df)
            idx = np.flatnonzero(np.isin(labels.subject_ids, enc.subject_ids))
            parts.append((enc, *label_cutoffs(enc, labels.subject_ids[idx], labels.times_us[idx])))
        modes = (("one_pass", False), ("per_label", True))
        enc0, s0, c0 = parts[0]
        for _, per_label in modes:  # warm-up (first-call costs of torch kernels)
            embed_cutoffs(model, enc0, s0[:64], c0[:64], "last", batch_size, per_label)
        embs: dict = {}
        wall: dict = {mode: [] for mode, _ in modes}
        cpu: dict = {mode: [] for mode, _ in modes}
        for _ in range(repeats):  # interleaved, so drifting load hits both paths alike
            for mode, per_label in modes:
                t0, p0 = time.perf_counter(), time.process_time()
                e = [
                    embed_cutoffs(model, enc, s_idx, cut, "last", batch_size, per_label)
                    for enc, s_idx, cut in parts
                ]
                wall[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - p0)
                embs[mode] = np.concatenate(e)
        for mode, per_label in modes:
            # Tokens forwarded (the pass over every label's own history vs one per window).
            r[f"{mode}_tokens"] = int(
                sum(
                    _plan_rows(enc, s_idx, cut, cfg.max_len, per_label).lengths.sum()
                    for enc, s_idx, cut in parts
                )
            )
            r[f"{mode}_embed_s"] = min(wall[mode])
            r[f"{mode}_embed_cpu_s"] = min(cpu[mode])
            r[f"{mode}_labels_per_s"] = len(labels) / min(wall[mode])
            r[f"{mode}_labels_per_cpu_s"] = len(labels) / min(cpu[mode])
        r["max_rel_diff"] = float(
            np.abs(embs["one_pass"] - embs["per_label"]).max() / np.abs(embs["per_label"]).max()
        )
        r["speedup"] = r["one_pass_labels_per_s"] / r["per_label_labels_per_s"]
        r["speedup_cpu"] = r["one_pass_labels_per_cpu_s"] / r["per_label_labels_per_cpu_s"]
        # The ceiling on the work saved: tokens re-encoded / tokens of the one pass (the
        # re-encoding path forwards each label's prefix only, on average ~half a history).
        r["token_ratio"] = r["per_label_tokens"] / r["one_pass_tokens"]
        out[name] = r
        print(f"embedding ({name}):", json.dumps(r), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="EHR benchmarks")
    parser.add_argument("--subjects", type=int, default=8000)
    parser.add_argument("--out", default="bench_out/ehr")
    parser.add_argument(
        "--femr-python", default=None, help="python of a venv with femr + meds_reader"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--skip-embedding", action="store_true", help="only the tokenization benchmark"
    )
    parser.add_argument(
        "--meds", default=None, help="use this MEDS folder instead of generating one"
    )
    args = parser.parse_args()
    if args.worker == "healthfm":
        print(json.dumps(worker_healthfm(args.meds, args.tokenizer_json)))
        return
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meds_dir = Path(args.meds) if args.meds else out / f"synthetic_{args.subjects}"
    if not meds_dir.exists():
        from healthfm.ehr.synthetic import write_meds

        t = time.perf_counter()
        write_meds(meds_dir, args.subjects, seed=1, n_shards=4)
        print(f"generated {meds_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    results: dict = {"meds": str(meds_dir)}
    results["tokenize_healthfm"] = _run_worker(
        [sys.executable, __file__, "--worker", "healthfm", "--meds", str(meds_dir)]
    )
    print("healthfm tokenizer:", json.dumps(results["tokenize_healthfm"]), flush=True)
    tok_json = results["tokenize_healthfm"].get("tokenizer_json")
    if tok_json:  # encoding alone, in a fresh process (the fitted vocabulary loaded from JSON)
        results["tokenize_healthfm_encode_only"] = _run_worker(
            [
                *(sys.executable, __file__, "--worker", "healthfm", "--meds", str(meds_dir)),
                *("--tokenizer-json", tok_json),
            ]
        )
        print(
            "healthfm encode only:",
            json.dumps(results["tokenize_healthfm_encode_only"]),
            flush=True,
        )
    if args.femr_python:
        results["tokenize_femr"] = _run_worker([args.femr_python, "-c", FEMR_WORKER, str(meds_dir)])
        print("femr / meds_reader:", json.dumps(results["tokenize_femr"]), flush=True)
    results["embedding"] = {} if args.skip_embedding else bench_embedding(meds_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    h = results["tokenize_healthfm"]
    e_only = results.get("tokenize_healthfm_encode_only", {})
    print(
        f"\ntokenization: {h['events_per_s']:,.0f} events/s (encode), "
        f"{h['events_per_s_incl_fit']:,.0f} incl. fit; peak RSS over imports "
        f"+{h['peak_over_imports_mb']:.0f} MB (fit +{h['peak_fit_over_imports_mb']:.0f}, "
        f"encode +{h['peak_encode_over_imports_mb']:.0f}; encode alone in a fresh process "
        f"+{e_only.get('peak_over_imports_mb', float('nan')):.0f})"
    )
    f = results.get("tokenize_femr")
    if f and "events" in f:
        print(
            f"femr: {f['events_per_s']:,.0f} events/s (encode), {f['events_per_s_incl_fit']:,.0f} "
            f"incl. fit; peak RSS over imports +{f['peak_over_imports_mb']:.0f} MB (read pass + "
            f"fit +{f['peak_fit_over_imports_mb']:.0f}, encode +{f['peak_encode_over_imports_mb']:.0f}), "
            f"not counting the meds_reader conversion (own process, peak RSS "
            f"{f['convert_peak_rss_mb']:.0f} MB) -> healthfm "
            f"{h['events_per_s'] / f['events_per_s']:.0f}x events/s"
        )
        print(
            f"meds_reader: convert {f['meds_reader_convert_s']:.1f} s, then a full pass at "
            f"{f['meds_reader_events_per_s']:,.0f} events/s"
        )
    for name, e in results["embedding"].items():
        print(
            f"embedding ({name}, {e['labels_per_subject']:.1f} labels/subject): one pass "
            f"{e['one_pass_labels_per_s']:.0f} labels/s vs re-encoding per label "
            f"{e['per_label_labels_per_s']:.0f} -> {e['speedup']:.1f}x wall, "
            f"{e['speedup_cpu']:.1f}x CPU time (tokens forwarded {e['token_ratio']:.1f}x; "
            f"max rel diff {e['max_rel_diff']:.1e})"
        )


if __name__ == "__main__":
    main()
