"""EHR benchmarks: MEDS tokenization speed / memory, and prediction-time embedding speed.

Usage::

    .venv/bin/python benchmarks/bench_ehr.py [--subjects 8000] [--out bench_out/ehr]
        [--femr-python /tmp/femrvenv/bin/python]

1. Tokenization: events/s and peak RSS of healthfm's MEDS tokenizer (fit on train + encode
   every shard), each measured in a fresh subprocess on the same synthetic MEDS folder; and,
   when ``--femr-python`` points at an environment with ``femr`` and ``meds_reader``
   installed (femr pins an older ``meds``, so it cannot share our venv), FEMR's
   ``meds_reader`` conversion + a full pass over every event, and FEMR's tokenizer.
2. Embedding: labels/s of the one-pass-per-subject path vs re-encoding each label's
   history separately (one forward row per label), on subjects with at least 5 labels,
   with the same model; both give the same embeddings (checked here to 1e-4).

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


def worker_healthfm(meds_dir: str) -> dict:
    """Fit the tokenizer on train, encode every shard; report events/s and peak RSS."""
    from healthfm.ehr import open_meds
    from healthfm.ehr.reader import iter_shards
    from healthfm.ehr.tokenizer import MedsTokenizer

    ds = open_meds(meds_dir)
    train = np.array([s for s, sp in ds.splits.items() if sp == "train"])
    base = _reset_peak()
    t0 = time.perf_counter()
    tok = MedsTokenizer.fit(ds, train)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    n_events = n_tokens = 0
    for _, df in iter_shards(ds):
        enc = tok.encode_frame(df)
        n_events += enc.n_events
        n_tokens += len(enc.ids)
    t_enc = time.perf_counter() - t1
    return {
        "tool": "healthfm",
        "events": n_events,
        "tokens": n_tokens,
        "fit_s": t_fit,
        "encode_s": t_enc,
        "events_per_s": n_events / t_enc,
        "events_per_s_incl_fit": n_events / (t_fit + t_enc),
        "peak_rss_mb": _status("VmHWM"),
        "rss_after_imports_mb": base,
    }


FEMR_WORKER = r"""
import json, os, resource, subprocess, sys, tempfile, time
meds_dir = sys.argv[1]
out = {"tool": "femr"}
t0 = time.perf_counter()
db_path = os.path.join(tempfile.mkdtemp(), "db")
subprocess.run(["meds_reader_convert", meds_dir, db_path, "--num_threads", "1"], check=True,
               capture_output=True)
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
    proc = fp.FEMRBatchProcessor(tok)
    t3 = time.perf_counter()
    for sid in db:
        proc.convert_subject(db[sid])
    out["encode_s"] = time.perf_counter() - t3
    out["events_per_s"] = n / out["encode_s"]
    out["events_per_s_incl_fit"] = n / (out["fit_s"] + out["encode_s"])
    try:  # FEMR's batched path (Hugging Face datasets), its recommended way
        t4 = time.perf_counter()
        proc.convert_dataset(db, tokens_per_batch=8192, num_proc=1)
        out["convert_dataset_s"] = time.perf_counter() - t4
        out["convert_dataset_events_per_s"] = n / out["convert_dataset_s"]
    except Exception as exc:  # reported, not hidden
        out["convert_dataset_error"] = f"{type(exc).__name__}: {exc}"[:300]
out["peak_rss_mb"] = _status("VmHWM")
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


def bench_embedding(meds_dir: Path, batch_size: int = 32, max_subjects: int = 150) -> dict:
    """labels/s: one forward pass per subject vs one per label (same model, same labels).

    Two label sets on the same subjects: the task's labels (subjects with >= 5), and one
    prediction time at 23:59 of every day with an event (as when scoring every visit).
    """
    import polars as pl
    import torch

    from healthfm.ehr import featurize_labels, open_meds, read_labels, scan_meds
    from healthfm.ehr.reader import iter_shards
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
        r = {"labels": len(labels), "subjects": int(labels.frame["subject_id"].n_unique())}
        r["labels_per_subject"] = r["labels"] / r["subjects"]
        embs = {}
        for mode, per_label in (("one_pass", False), ("per_label", True)):
            feats = featurize_labels(
                ds, tok, labels, model, batch_size=batch_size, per_label=per_label
            )
            r[f"{mode}_embed_s"] = feats.seconds_embed
            r[f"{mode}_labels_per_s"] = len(labels) / feats.seconds_embed
            embs[mode] = feats.embeddings
        r["max_rel_diff"] = float(
            np.abs(embs["one_pass"] - embs["per_label"]).max() / np.abs(embs["per_label"]).max()
        )
        r["speedup"] = r["one_pass_labels_per_s"] / r["per_label_labels_per_s"]
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
    parser.add_argument(
        "--meds", default=None, help="use this MEDS folder instead of generating one"
    )
    args = parser.parse_args()
    if args.worker == "healthfm":
        print(json.dumps(worker_healthfm(args.meds)))
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
    if args.femr_python:
        results["tokenize_femr"] = _run_worker([args.femr_python, "-c", FEMR_WORKER, str(meds_dir)])
        print("femr / meds_reader:", json.dumps(results["tokenize_femr"]), flush=True)
    results["embedding"] = bench_embedding(meds_dir)
    print("embedding:", json.dumps(results["embedding"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    h = results["tokenize_healthfm"]
    print(
        f"\ntokenization: {h['events_per_s']:,.0f} events/s (encode), {h['events_per_s_incl_fit']:,.0f} "
        f"incl. fit, peak RSS {h['peak_rss_mb']:.0f} MB ({h['rss_after_imports_mb']:.0f} MB after imports)"
    )
    f = results.get("tokenize_femr")
    if f and "events" in f:
        print(
            f"femr: {f['events_per_s']:,.0f} events/s (encode), {f['events_per_s_incl_fit']:,.0f} incl. fit, "
            f"peak RSS {f['peak_rss_mb']:.0f} MB ({f['rss_after_imports_mb']:.0f} MB after imports) -> "
            f"healthfm {h['events_per_s'] / f['events_per_s']:.0f}x"
        )
        print(
            f"meds_reader: convert {f['meds_reader_convert_s']:.1f} s (peak RSS {f['convert_peak_rss_mb']:.0f} MB), "
            f"then a full pass at {f['meds_reader_events_per_s']:,.0f} events/s"
        )
    for name, e in results["embedding"].items():
        print(
            f"embedding ({name}): one pass {e['one_pass_labels_per_s']:.1f} labels/s vs re-encoding per label "
            f"{e['per_label_labels_per_s']:.1f} labels/s -> {e['speedup']:.1f}x "
            f"({e['labels_per_subject']:.1f} labels/subject, max rel diff {e['max_rel_diff']:.1e})"
        )


if __name__ == "__main__":
    main()
