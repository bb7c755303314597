"""Single-cell benchmarks: tokenization vs Geneformer's per-cell loop, embedding vs BertModel.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_singlecell.py                 # 100,000 x 2,000, as in the issue
    .venv/bin/python benchmarks/bench_singlecell.py --cells 20000   # quicker

1. Tokenization. A sparse matrix of integer counts (cells x genes, Poisson counts with
   log-normal gene means and cell sizes, about 12% non-zero) is rank-value tokenized

   * by healthfm (``SingleCellModality.encode``: vectorized per block of 4,096 cells), and
   * by a faithful re-implementation of Geneformer's ``TranscriptomeTokenizer.tokenize_anndata``
     (as shipped in the ``geneformer`` and ``helical`` packages; installing them pulls a
     pinned torch/transformers stack, so the algorithm is re-implemented here line by line):
     chunks of 512 cells, ``X / n_counts * 10,000 / gene medians`` with scipy, a CSR copy,
     then per cell ``tokens[np.argsort(-row.data)]``, then per cell truncation with
     ``<cls>`` / ``<eos>`` (95M-model style).

   Both use the same gene medians (fitted by healthfm on the first 70% of the cells).
   Reported: cells/s (best of ``--repeats``), peak traced memory (tracemalloc, separate
   run, outputs kept in memory in both cases), and whether the gene order is identical on
   a checked sample of cells.

2. Embedding. ``healthfm.scverse.tl.embed`` (read + validate + tokenize + embed, from
   an AnnData) vs a Hugging Face ``transformers`` ``BertModel`` of the same size (tiny
   preset: d=128, 4 layers, 4 heads, FFN 512) on the same token ids, batches of 128,
   padded to the longest in each batch (data order, as a DataLoader would; also reported
   after sorting by length). Weights are random: speed does not depend on them.

All numbers are from one run on one machine; compare the printed ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp


def synthetic_counts(
    n_cells: int, n_genes: int, seed: int = 0, block: int = 10_000
) -> sp.csr_matrix:
    """Poisson counts with log-normal gene means and cell sizes (CSR float32)."""
    rng = np.random.default_rng(seed)
    gene_mean = rng.lognormal(mean=-3.2, sigma=1.6, size=n_genes)
    parts = []
    for lo in range(0, n_cells, block):
        n = min(block, n_cells - lo)
        size = rng.lognormal(0.0, 0.35, size=n)
        counts = rng.poisson(size[:, None] * gene_mean[None, :]).astype(np.float32)
        parts.append(sp.csr_matrix(counts))
    x = sp.vstack(parts, format="csr")
    empty = np.flatnonzero(np.diff(x.indptr) == 0)
    if empty.size:  # every cell needs one expressed gene
        x = x.tolil()
        x[empty, 0] = 1
        x = x.tocsr()
    return x


# ---- Geneformer's tokenizer, re-implemented faithfully (per-cell loop) ---------------------


def _rank_genes(gene_vector: np.ndarray, gene_tokens: np.ndarray) -> np.ndarray:
    # geneformer/tokenizer.py: rank_genes
    sorted_indices = np.argsort(-gene_vector)
    return gene_tokens[sorted_indices]


def geneformer_tokenize(
    x: sp.csr_matrix,
    n_counts: np.ndarray,
    norm_factor_vector: np.ndarray,
    gene_tokens: np.ndarray,
    coding_loc: np.ndarray,
    cls_token: int,
    eos_token: int,
    model_input_size: int = 4096,
    target_sum: float = 10_000,
    chunk_size: int = 512,
) -> list[np.ndarray]:
    """TranscriptomeTokenizer.tokenize_anndata + the special-token truncation step."""
    tokenized_cells = []
    filter_pass_loc = np.arange(x.shape[0])
    for i in range(0, len(filter_pass_loc), chunk_size):
        idx = filter_pass_loc[i : i + chunk_size]
        counts = n_counts[idx][:, None]
        x_view0 = x[idx, :]
        x_view = x_view0[:, coding_loc]
        x_norm = (x_view / counts) * target_sum / norm_factor_vector.reshape(1, -1)
        x_norm = sp.csr_matrix(x_norm)
        tokenized_cells += [
            _rank_genes(x_norm[j].data, gene_tokens[x_norm[j].indices])
            for j in range(x_norm.shape[0])
        ]
    # Truncate and add <cls>/<eos> (special_token=True), one cell at a time.
    return [
        np.concatenate([[cls_token], cell[: model_input_size - 2], [eos_token]])
        for cell in tokenized_cells
    ]


def _time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        gc.collect()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return peak


def bench_tokenize(n_cells: int, n_genes: int, repeats: int, check: int) -> dict:
    from healthfm.modality import Samples, get_modality
    from healthfm.singlecell.reader import CountMatrix
    from healthfm.tokenizer import N_SPECIAL

    sc = get_modality("singlecell")
    t = time.perf_counter()
    x = synthetic_counts(n_cells, n_genes)
    print(
        f"matrix: {n_cells:,} cells x {n_genes:,} genes, {x.nnz:,} non-zeros "
        f"({100 * x.nnz / (n_cells * n_genes):.1f}%), {np.diff(x.indptr).mean():.0f} genes/cell "
        f"(made in {time.perf_counter() - t:.1f} s)"
    )
    genes = np.array([f"G{i}" for i in range(n_genes)], dtype=object)
    totals = np.asarray(x.sum(axis=1), dtype=np.float64).reshape(-1)
    matrix = CountMatrix(
        genes=genes, totals=totals, matrix=x, extra={"n_expressed": np.diff(x.indptr)}
    )
    samples = Samples(
        source="synthetic",
        keys=np.array([f"c{i}" for i in range(n_cells)]),
        groups=np.arange(n_cells),
        labels=None,
        payload=matrix,
        data_hash="-",
    )
    train = np.arange(int(0.7 * n_cells))
    tok = sc.fit_tokenizer(samples, train, {"tokenizer": "rank", "max_length": 2048})

    def ours():
        return list(sc.encode(tok, samples))

    col_map = tok.column_map(genes)
    coding_loc = np.flatnonzero(col_map >= 0)
    norm = tok.medians[col_map[coding_loc]]
    tokens = (N_SPECIAL + col_map[coding_loc]).astype(np.int64)

    def reference():
        return geneformer_tokenize(
            x,
            totals,
            norm,
            tokens,
            coding_loc,
            cls_token=2,
            eos_token=4,
            model_input_size=tok.max_length + 1,
        )

    t_ours, chunks = _time(ours, repeats)
    t_ref, ref_cells = _time(reference, max(1, repeats - 1))
    checked = np.unique(np.linspace(0, n_cells - 1, check).astype(int))
    ours_cells = {}
    offset = 0
    for chunk in chunks:
        for i in checked[(checked >= offset) & (checked < offset + len(chunk))]:
            ours_cells[i] = chunk.sample(i - offset)["ids"][1:]
        offset += len(chunk)
    identical = sum(np.array_equal(ours_cells[i], ref_cells[i][1:-1]) for i in checked)
    # Geneformer's np.argsort(-x) is not stable: among exactly tied scores (same count, same
    # gene median) its order is arbitrary. Compare with ties put in token order on both sides.
    token_median = np.zeros(tok.vocab_size)
    token_median[tokens] = norm
    up_to_ties = 0
    for i in checked:
        row = x[i]
        score = np.zeros(tok.vocab_size)
        vocab = col_map[row.indices]
        ok = vocab >= 0
        score[N_SPECIAL + vocab[ok]] = row.data[ok] / totals[i] * 1e4
        score = score / np.where(token_median > 0, token_median, 1)

        a, b = ours_cells[i], ref_cells[i][1:-1]
        up_to_ties += np.array_equal(a[np.lexsort((a, -score[a]))], b[np.lexsort((b, -score[b]))])
    del chunks, ref_cells
    peak_ours = _peak(ours)
    peak_ref = _peak(reference)
    return {
        "cells": n_cells,
        "ours_s": t_ours,
        "ref_s": t_ref,
        "ours_cps": n_cells / t_ours,
        "ref_cps": n_cells / t_ref,
        "peak_ours": peak_ours,
        "peak_ref": peak_ref,
        "checked": len(checked),
        "identical": identical,
        "up_to_ties": up_to_ties,
        "x": x,
        "tok": tok,
        "genes": genes,
    }


def bench_embed(adata, tok, batch_size: int, repeats: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from healthfm.modality import get_modality
    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel
    from healthfm.scverse import tl
    from healthfm.tokens import TokenStore
    from healthfm.train.data import collate

    n_cells = adata.n_obs
    lengths = np.minimum(np.diff(adata.X.indptr), tok.max_length - 1) + 1
    max_len = int(1 << int(lengths.max() - 1).bit_length())
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", modality="singlecell", vocab_size=tok.vocab_size, max_len=max_len
    )
    model = FoundationModel(config)
    model.tokenizer = tok
    model.eval()

    def ours():
        tl.embed(adata, model, batch_size=batch_size)
        return adata.obsm["X_healthfm"]

    t_ours, _ = _time(ours, repeats)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        samples = get_modality("singlecell").read(adata, {})
        get_modality("singlecell").tokenize(tok, samples, f"{tmp}/store")
        store = TokenStore(f"{tmp}/store")
        bert = BertModel(
            BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=512,
                max_position_embeddings=max_len,
                hidden_act="gelu",
            ),
            add_pooling_layer=False,
        ).eval()
        n_bert = sum(p.numel() for p in bert.parameters())
        n_ours = sum(p.numel() for p in model.backbone.parameters())

        def run_bert(order: np.ndarray):
            # Tokens already collated on the host, as a DataLoader would hand them over.
            batches = [
                collate(store, order[i : i + batch_size]) for i in range(0, n_cells, batch_size)
            ]

            def go():
                out = []
                with torch.inference_mode():
                    for b in batches:
                        h = bert(
                            input_ids=b["ids"], attention_mask=b["attention_mask"].long()
                        ).last_hidden_state
                        m = b["attention_mask"].unsqueeze(-1).float()
                        out.append((h * m).sum(1) / m.sum(1))
                return out

            return _time(go, repeats)[0]

        t_bert = run_bert(np.arange(n_cells))
        t_bert_sorted = run_bert(np.argsort(store.lengths, kind="stable"))
    return {
        "cells": n_cells,
        "ours_cps": n_cells / t_ours,
        "bert_cps": n_cells / t_bert,
        "bert_sorted_cps": n_cells / t_bert_sorted,
        "mean_tokens": float(lengths.mean()),
        "params_ours": n_ours,
        "params_bert": n_bert,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--check", type=int, default=1_000, help="cells whose token order is compared"
    )
    parser.add_argument(
        "--embed-data",
        choices=("pbmc", "synthetic"),
        default="pbmc",
        help="cells to embed: the bundled real PBMC counts (700 cells, 183-409 genes each) "
        "or the first --embed-cells synthetic cells",
    )
    parser.add_argument("--embed-cells", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--skip-embed", action="store_true")
    args = parser.parse_args()

    r = bench_tokenize(args.cells, args.genes, args.repeats, args.check)
    print("\nrank-value tokenization (Geneformer algorithm)")
    print(
        f"  healthfm (vectorized)      {r['ours_cps']:>12,.0f} cells/s   peak {r['peak_ours'] / 2**20:8.1f} MiB"
    )
    print(
        f"  Geneformer per-cell loop   {r['ref_cps']:>12,.0f} cells/s   peak {r['peak_ref'] / 2**20:8.1f} MiB"
    )
    print(
        f"  speed ratio {r['ours_cps'] / r['ref_cps']:.2f}x   memory ratio {r['peak_ours'] / r['peak_ref']:.2f}   "
        f"identical gene order on {r['identical']}/{r['checked']} checked cells, "
        f"{r['up_to_ties']}/{r['checked']} once exactly tied scores are put in token order"
    )
    if args.skip_embed:
        return
    import anndata as ad
    import pandas as pd

    if args.embed_data == "pbmc":
        from healthfm.modality import get_modality
        from healthfm.singlecell import pbmc68k

        adata = ad.read_h5ad(pbmc68k())
        sc = get_modality("singlecell")
        tok = sc.fit_tokenizer(sc.read(adata, {}), np.arange(adata.n_obs), {})
    else:
        n = args.embed_cells
        adata = ad.AnnData(
            X=r["x"][:n].copy(),
            obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
            var=pd.DataFrame(index=list(r["genes"])),
        )
        tok = r["tok"]
    del r
    e = bench_embed(adata, tok, args.batch_size, args.repeats)
    print(
        f"\nembedding {e['cells']:,} {args.embed_data} cells ({e['mean_tokens']:.0f} tokens/cell on average, batch "
        f"{args.batch_size}, {e['threads']} torch threads; backbone parameters: ours {e['params_ours']:,}, "
        f"BertModel {e['params_bert']:,})"
    )
    print(f"  healthfm tl.embed (read+tokenize+embed)   {e['ours_cps']:>9,.0f} cells/s")
    print(
        f"  BertModel, batches in data order          {e['bert_cps']:>9,.0f} cells/s   "
        f"ratio {e['ours_cps'] / e['bert_cps']:.2f}x"
    )
    print(
        f"  BertModel, batches sorted by length       {e['bert_sorted_cps']:>9,.0f} cells/s   "
        f"ratio {e['ours_cps'] / e['bert_sorted_cps']:.2f}x"
    )


if __name__ == "__main__":
    main()
