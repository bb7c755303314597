"""Embedding throughput: healthfm's encoder vs a Hugging Face ``BertModel`` of the same size.

On the same token ids (bundled real data, tokenized once), for single-cell rank tokens
(PBMC cells: real lengths), DNA 6-mers (fixed-length promoters) and EHR timelines
(clinosim MEDS subjects):

* **HF, data order**: ``BertModel`` (SDPA attention), batches of ``--batch`` samples in
  input order, padded to the longest of each batch — how a DataLoader hands them over;
* **HF, sorted**: the same, batches sorted by length;
* **ours**: :func:`healthfm.evaluate.embed.embed_store` (length-sorted, token budget);
* **ours, packed**: the same with ``pack=True`` (several samples per row, block-diagonal).

Each in fp32 and under bf16 autocast. The methods alternate round by round so background
load hits all alike; the median of ``--rounds`` is reported with the ratio to HF data
order and to HF sorted. Random weights: speed does not depend on them.

    python benchmarks/bench_embed.py [--modalities singlecell dna ehr] [--n 512] [--rounds 3]

Needs ``transformers`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from healthfm.evaluate.embed import embed_store
from healthfm.modality import get_modality
from healthfm.model.config import PRESETS, ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.train.data import collate

DATA = Path(__file__).resolve().parents[1] / "src" / "healthfm" / "data"
INPUTS = {
    "singlecell": (DATA / "singlecell" / "pbmc68k_counts.h5ad", {}),
    "dna": (DATA / "dna" / "promoters.tsv", {"label_column": "label"}),
    "ehr": (DATA / "ehr" / "clinosim_meds", {}),
}


def token_store(modality_name: str, folder: Path, n: int):
    """The bundled input's first ``n`` samples, tokenized with a tokenizer fitted on them."""
    modality = get_modality(modality_name)
    path, options = INPUTS[modality_name]
    options = modality.options(options)
    samples = modality.read(path, options)
    idx = np.arange(min(n, len(samples)))
    tokenizer = modality.fit_tokenizer(samples, idx, options)
    return tokenizer, modality.tokenize(tokenizer, samples, folder / "store", idx)


def hf_embed(bert, store, order: np.ndarray, batch_size: int, max_len: int) -> None:
    for start in range(0, len(order), batch_size):
        b = collate(store, order[start : start + batch_size], max_len)
        mask = b["attention_mask"]
        h = bert(input_ids=b["ids"], attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        (h * m).sum(1) / m.sum(1)


def bench(modality_name: str, n: int, batch: int, rounds: int, preset: str) -> list[dict]:
    from transformers import BertConfig, BertModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, store = token_store(modality_name, Path(tmp), n)
        longest = int(store.lengths.max())
        max_len = 1 << (longest - 1).bit_length()
        p = PRESETS[preset]
        torch.manual_seed(0)
        ours = FoundationModel(
            ModelConfig.from_preset(
                preset, modality=modality_name, vocab_size=tokenizer.vocab_size, max_len=max_len
            )
        ).eval()
        bert = BertModel(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=p["d_model"],
                num_hidden_layers=p["n_layers"],
                num_attention_heads=p["n_heads"],
                intermediate_size=p["d_ff"],
                max_position_embeddings=max_len,
                attn_implementation="sdpa",
            ),
            add_pooling_layer=False,
        ).eval()
        data_order = np.arange(len(store))
        by_length = np.argsort(store.lengths, kind="stable")
        methods = {
            "HF, data order": lambda: hf_embed(bert, store, data_order, batch, max_len),
            "HF, sorted": lambda: hf_embed(bert, store, by_length, batch, max_len),
            "ours": lambda: embed_store(ours, store, "mean", batch_size=max(batch, 128)),
            "ours, packed": lambda: embed_store(
                ours, store, "mean", batch_size=max(batch, 128), pack=True
            ),
        }
        out = []
        for bf16 in (False, True):
            times = {name: [] for name in methods}
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                for fn in methods.values():  # warm-up
                    fn()
                for _ in range(rounds):
                    for name, fn in methods.items():
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
            rate = {k: len(store) / statistics.median(v) for k, v in times.items()}
            for name, r in rate.items():
                out.append(
                    {
                        "modality": modality_name,
                        "dtype": "bf16" if bf16 else "fp32",
                        "method": name,
                        "items_per_s": r,
                        "vs_hf_data_order": r / rate["HF, data order"],
                        "vs_hf_sorted": r / rate["HF, sorted"],
                        "n": len(store),
                        "mean_tokens": float(store.lengths.mean()),
                        "max_tokens": longest,
                    }
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modalities", nargs="+", default=["singlecell", "dna", "ehr"])
    parser.add_argument("--n", type=int, default=512, help="samples per modality")
    parser.add_argument("--batch", type=int, default=32, help="HF batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, preset {args.preset}, "
        f"median of {args.rounds} rounds"
    )
    print(
        f"{'modality':<11}{'dtype':<6}{'method':<16}{'items/s':>10}"
        f"{'÷ HF data order':>17}{'÷ HF sorted':>13}"
    )
    for name in args.modalities:
        rows = bench(name, args.n, args.batch, args.rounds, args.preset)
        r0 = rows[0]
        print(
            f"-- {name}: {r0['n']} samples, mean {r0['mean_tokens']:.0f} tokens, "
            f"longest {r0['max_tokens']}"
        )
        for r in rows:
            print(
                f"{r['modality']:<11}{r['dtype']:<6}{r['method']:<16}{r['items_per_s']:>10,.1f}"
                f"{r['vs_hf_data_order']:>16.2f}×{r['vs_hf_sorted']:>12.2f}×",
                flush=True,
            )


if __name__ == "__main__":
    main()
