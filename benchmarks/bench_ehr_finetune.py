"""EHR fine-tuning rows: one shared causal pass per subject vs one padded row per label.

Same model, same label rows, same (subject-grouped) order and batch size; each batch does a
forward and a backward pass through the task head, as fine-tuning does. Prints rows/s of
both, their ratio, the tokens each forwards, and the largest difference between their head
outputs (they must agree: a row's causal state depends only on its own tokens).

Run::

    .venv/bin/python benchmarks/bench_ehr_finetune.py [--meds DIR] [--rows 2000]

Defaults: the bundled ``synthetic_meds`` folder, its ``admission_1y`` labels, a tiny causal
model with random weights (speed does not depend on them). Numbers are one run on one
machine; compare the two paths within the run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from healthfm.ehr import EhrModality
from healthfm.ehr.finetune import label_windows
from healthfm.ehr.reader import read_labels
from healthfm.evaluate.task_head import _head_outputs, with_task_head
from healthfm.model import FoundationModel, ModelConfig

DATA = Path(__file__).resolve().parent.parent / "src" / "healthfm" / "data" / "ehr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meds", default=str(DATA / "synthetic_meds"))
    parser.add_argument("--task", default="admission_1y")
    parser.add_argument("--rows", type=int, default=2000, help="label rows timed per path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modality = EhrModality()
    samples = modality.read(args.meds, {})
    train = samples.keys[modality.split(samples, "healthfm", (0.7, 0.1, 0.2)) == "train"]
    tokenizer = modality.fit_tokenizer(samples, np.flatnonzero(np.isin(samples.keys, train)), {})
    defaults = modality.model_defaults(tokenizer, samples, {})
    torch.manual_seed(0)
    config = ModelConfig(
        modality="ehr", vocab_size=tokenizer.vocab_size, objective="causal", **defaults
    )
    spec = {"task": "binary", "pooling": "last", "n_outputs": 1, "classes": [0, 1]}
    model = with_task_head(FoundationModel(config), spec)
    labels = read_labels(Path(args.meds) / "task_labels" / args.task / "labels.parquet")
    ds = samples.payload["dataset"]
    sources = {
        shared: label_windows(ds, tokenizer, labels, config.max_len, True, shared=shared)
        for shared in (False, True)
    }
    rng = np.random.default_rng(0)
    order = sources[True].group_order(rng.permutation(len(labels)))[: args.rows]
    batches = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    print(
        f"{len(labels)} label rows of {len(np.unique(labels.subject_ids))} subjects; timing "
        f"{len(order)} rows in batches of {args.batch_size}, context {config.max_len}"
    )
    results = {}
    for shared in (False, True):
        source = sources[shared]
        tokens = 0
        t = time.perf_counter()
        for idx in batches:
            batch = source.batch(idx)
            tokens += int(batch["attention_mask"].sum())
            out = _head_outputs(model, batch, "last")
            out.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        results[shared] = (len(order) / seconds, tokens)
        name = "shared pass per subject" if shared else "one padded row per label"
        print(f"  {name:<26} {len(order) / seconds:8.1f} rows/s, {tokens:,} tokens forwarded")
    with torch.no_grad():
        model.eval()
        a = _head_outputs(model, sources[True].batch(batches[0]), "last")
        b = _head_outputs(model, sources[False].batch(batches[0]), "last")
    print(
        f"shared / per-label: {results[True][0] / results[False][0]:.2f}x rows/s, "
        f"{results[False][1] / results[True][1]:.2f}x fewer tokens; "
        f"max |difference| of head outputs {float((a - b).abs().max()):.2e}"
    )


if __name__ == "__main__":
    main()
