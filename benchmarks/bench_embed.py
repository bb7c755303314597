"""Embedding at scale: speed against a Hugging Face reference, processes, memory.

Three parts, each printing the ratios it measures in one run:

``speed``
    healthfm's encoder vs a ``transformers`` model of the same width, depth, heads and MLP
    (``BertModel`` for token inputs, ``ViTModel`` for tiles; SDPA attention), on the same
    inputs: single-cell rank tokens (PBMC cells: real lengths), DNA 6-mers (splice sites,
    fixed length), EHR timelines (clinosim subjects, context 2,048) and 224 px tiles
    (Kather 2016). The reference runs batches of ``--batch`` in data order (how a
    DataLoader hands them over) and sorted by length, each padded to its longest, as HF
    does; ours is :func:`healthfm.inference.embed_store` (length-sorted batches
    within a token budget), also packed (several samples per row, block-diagonal
    attention) and, with ``--compile``, through ``torch.compile``. fp32 and bf16
    autocast; methods alternate round by round so background load hits all alike; the
    median of ``--rounds``. Random weights: speed does not depend on them.
``processes``
    ``healthfm embed`` on the same input by one process and by ``torchrun`` with two
    (gloo), each on its share of the parts; the final lines' throughputs, and whether
    the two outputs agree.
``memory``
    Peak RSS of ``healthfm embed`` writing an ``.h5ad`` with ``obsm`` for generated
    backed ``.h5ad`` atlases of 100,000 and 1,000,000 cells (2,000 genes, 10-40 expressed
    per cell), measured by ``wait4`` on the child process.

    python benchmarks/bench_embed.py [speed processes memory] [--device cuda] [--compile]

Needs ``transformers`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from healthfm.inference import embed_store, load_embeddings
from healthfm.modality import get_modality
from healthfm.model.config import PRESETS, ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.train.data import collate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "healthfm" / "data"
INPUTS = {
    "singlecell": (DATA / "singlecell" / "pbmc68k_counts.h5ad", {}),
    "dna": (DATA / "dna" / "splice.tsv", {"label_column": "label"}),
    "ehr": (DATA / "ehr" / "clinosim_meds", {}),
}
#: EHR context of the benchmark models (longer timelines keep their last 2,048 tokens).
EHR_CONTEXT = 2048


# ---------------------------------------------------------------------------------- speed
def token_store(modality_name: str, folder: Path, n: int):
    """The bundled input's first ``n`` samples, tokenized with a tokenizer fitted on them."""
    modality = get_modality(modality_name)
    path, options = INPUTS[modality_name]
    options = modality.options(options)
    samples = modality.read(path, options)
    idx = np.arange(min(n, len(samples)))
    tokenizer = modality.fit_tokenizer(samples, idx, options)
    return tokenizer, modality.tokenize(tokenizer, samples, folder / "store", idx)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_embed(bert, store, order: np.ndarray, batch_size: int, max_len: int, device, truncate):
    """HF's way: batches in the given order, padded to their longest, masked mean pool."""
    for start in range(0, len(order), batch_size):
        b = collate(store, order[start : start + batch_size], max_len, truncate)
        mask = b["attention_mask"].to(device)
        h = bert(input_ids=b["ids"].to(device), attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        ((h * m).sum(1) / m.sum(1)).float().cpu()


def _token_methods(name: str, n: int, batch: int, preset: str, device, compile_: bool, tmp):
    from transformers import BertConfig, BertModel

    tokenizer, store = token_store(name, Path(tmp), n)
    longest = int(store.lengths.max())
    max_len = 1 << (longest - 1).bit_length()
    truncate = "head"
    if name == "ehr":
        max_len, truncate = min(max_len, EHR_CONTEXT), "tail"
    p = PRESETS[preset]
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        preset, modality=name, vocab_size=tokenizer.vocab_size, max_len=max_len
    )
    ours = FoundationModel(config).eval().to(device)
    ours.config.truncate = truncate
    bert = (
        BertModel(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=p["d_model"],
                num_hidden_layers=p["n_layers"],
                num_attention_heads=p["n_heads"],
                intermediate_size=p["d_ff"],
                max_position_embeddings=max_len,
                attn_implementation="sdpa",
                # EHR models are causal: the reference attends causally too (same work).
                is_decoder=name == "ehr",
            ),
            add_pooling_layer=False,
        )
        .eval()
        .to(device)
    )
    data_order = np.arange(len(store))
    by_length = np.argsort(store.lengths, kind="stable")
    lengths = np.minimum(store.lengths, max_len)

    def methods(bf16: bool) -> dict:
        out = {
            "HF, data order": lambda: hf_embed(
                bert, store, data_order, batch, max_len, device, truncate
            ),
            "HF, sorted": lambda: hf_embed(
                bert, store, by_length, batch, max_len, device, truncate
            ),
            "ours": lambda: embed_store(ours, store, "mean", 1024, bf16, device=device),
            "ours, packed": lambda: embed_store(
                ours, store, "mean", 1024, bf16, device=device, pack=True
            ),
        }
        if compile_:
            out["ours, compiled"] = lambda: embed_store(
                ours, store, "mean", 1024, bf16, device=device, compile=True
            )
        return out

    facts = {
        "n": len(store),
        "mean_tokens": float(lengths.mean()),
        "max_tokens": int(lengths.max()),
    }
    return methods, facts


def _tile_methods(n: int, batch: int, preset: str, device, compile_: bool, tmp):
    from transformers import ViTConfig, ViTModel

    from healthfm.pathology.tilesets import read_class_folders
    from healthfm.pathology.tokenizer import PatchTokenizer

    tiles = read_class_folders(DATA / "pathology" / "kather2016_samples")
    tok = PatchTokenizer(224, 16)
    raw = tiles.load(np.arange(len(tiles.keys)), 224)
    images = tok.to_float(raw[np.arange(n) % len(raw)])
    p = PRESETS[preset]
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        preset,
        modality="pathology",
        vocab_size=tok.vocab_size,
        max_len=tok.n_tokens,
        input_dim=tok.input_dim,
        objective="masked",
    )
    ours = FoundationModel(config).eval().to(device)
    vit = (
        ViTModel(
            ViTConfig(
                hidden_size=p["d_model"],
                num_hidden_layers=p["n_layers"],
                num_attention_heads=p["n_heads"],
                intermediate_size=p["d_ff"],
                image_size=224,
                patch_size=16,
                attn_implementation="sdpa",
            ),
            add_pooling_layer=False,
        )
        .eval()
        .to(device)
    )

    def hf():
        for start in range(0, n, batch):
            x = images[start : start + batch].to(device)
            vit(pixel_values=x).last_hidden_state.mean(1).float().cpu()

    compiled = {}

    def ours_run(bf16: bool, compile_it: bool):
        embed = ours.embed
        if compile_it:  # compiled once, on first use
            embed = compiled.setdefault("embed", torch.compile(ours.embed, dynamic=True))
        for start in range(0, n, batch):
            b = tok.encode_images(images[start : start + batch])
            b = {k: v.to(device) for k, v in b.items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                embed(b, "mean").float().cpu()

    def methods(bf16: bool) -> dict:
        out = {"HF ViT": hf, "ours": lambda: ours_run(bf16, False)}
        if compile_:
            out["ours, compiled"] = lambda: ours_run(bf16, True)
        return out

    return methods, {"n": n, "mean_tokens": float(tok.n_tokens), "max_tokens": tok.n_tokens}


def bench_speed(name: str, args, device: torch.device) -> list[dict]:
    """Items/s of every method, fp32 and bf16, and the ratios to the references."""
    with tempfile.TemporaryDirectory() as tmp:
        if name == "tiles":
            methods, facts = _tile_methods(args.n_tiles, 64, args.preset, device, args.compile, tmp)
        else:
            n = args.n_ehr if name == "ehr" else args.n
            methods, facts = _token_methods(
                name, n, args.batch, args.preset, device, args.compile, tmp
            )
        rows = []
        for bf16 in (False, True):
            table = methods(bf16)
            times = {k: [] for k in table}
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                for fn in table.values():  # warm-up (and compilation)
                    fn()
                _sync(device)
                for _ in range(args.rounds):
                    for k, fn in table.items():
                        t = time.perf_counter()
                        fn()
                        _sync(device)
                        times[k].append(time.perf_counter() - t)
            rate = {k: facts["n"] / statistics.median(v) for k, v in times.items()}
            refs = [k for k in rate if k.startswith("HF")]
            for k, r in rate.items():
                rows.append(
                    {"modality": name, "dtype": "bf16" if bf16 else "fp32", "method": k,
                     "items_per_s": r, **{f"vs {ref}": r / rate[ref] for ref in refs}, **facts}
                )  # fmt: skip
        return rows


def print_speed(rows: list[dict], fp32_rates: dict) -> None:
    r0 = rows[0]
    refs = [k[3:] for k in r0 if k.startswith("vs ")]
    print(
        f"-- {r0['modality']}: {r0['n']} samples, mean {r0['mean_tokens']:.0f} tokens, "
        f"longest {r0['max_tokens']}"
    )
    for r in rows:
        ratios = "".join(f"{r['vs ' + ref]:>9.2f}× {ref}" for ref in refs)
        extra = ""
        if r["dtype"] == "bf16":
            extra = f"   bf16 ÷ fp32 {r['items_per_s'] / fp32_rates[r['method']]:.2f}×"
        print(
            f"{r['modality']:<11}{r['dtype']:<6}{r['method']:<16}{r['items_per_s']:>10,.1f}/s"
            f"{ratios}{extra}",
            flush=True,
        )


# ------------------------------------------------------------------------------ processes
def _env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _healthfm(*args) -> list[str]:
    return [sys.executable, "-m", "healthfm", *map(str, args)]


def _final_rate(stdout: str) -> tuple[int, float, float]:
    m = re.search(r"embedded ([\d,]+) rows .* in ([\d.]+) s \(([\d,.]+)/s", stdout)
    if not m:
        raise RuntimeError(f"no final line in: {stdout[-2000:]}")
    return int(m.group(1).replace(",", "")), float(m.group(2)), float(m.group(3).replace(",", ""))


def bench_processes(args) -> dict:
    """One process (all cores) vs two torchrun processes (one core each) on one input."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = (DATA / "dna" / "splice.tsv").read_text().splitlines()
        header, body = lines[0], lines[1:]
        # The splice sites again and again (keys are row numbers: row0, row1, ...).
        rows = [header, *(body[i % len(body)] for i in range(args.rows))]
        data = tmp / "dna.tsv"
        data.write_text("\n".join(rows) + "\n")
        model = tmp / "model"
        subprocess.run(
            _healthfm("pretrain", "dna", DATA / "dna" / "promoters.tsv", "--out", model,
                      "--steps", "2", "--batch-size", "8", "--eval-every", "0",
                      "--preset", args.preset),
            env=_env(), check=True, capture_output=True,
        )  # fmt: skip
        results = {}
        one = subprocess.run(
            _healthfm("embed", model, data, "--out", tmp / "one.parquet", "--device", "cpu"),
            env=_env(), check=True, capture_output=True, text=True,
        )  # fmt: skip
        results[1] = _final_rate(one.stdout)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        two = subprocess.run(
            [*torchrun, "-m", "healthfm", "embed", str(model), str(data),
             "--out", str(tmp / "two.parquet"), "--device", "cpu"],
            env=_env(1), check=True, capture_output=True, text=True,
        )  # fmt: skip
        results[2] = _final_rate(two.stdout)
        k1, e1 = load_embeddings(tmp / "one.parquet")
        k2, e2 = load_embeddings(tmp / "two.parquet")
        agree = k1 == k2 and float(np.abs(e1 - e2).max())
    print(f"-- processes: healthfm embed, {args.rows:,} DNA sequences, preset {args.preset}")
    for procs, (n, seconds, rate) in results.items():
        print(f"{procs} process(es): {n:,} rows in {seconds:.1f} s, {rate:,.1f}/s")
    ratio = results[2][2] / results[1][2]
    print(f"2 processes ÷ 1: {ratio:.2f}×; outputs agree to {agree:.1e} (max abs difference)")
    return {"ratio": ratio, "results": results}


# --------------------------------------------------------------------------------- memory
def write_atlas(path: Path, n_cells: int, n_genes: int = 2000, seed: int = 0) -> None:
    """A synthetic count matrix, 10-40 expressed genes per cell, written as ``.h5ad``."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_cells, 10_000):
        m = min(10_000, n_cells - start)
        k = rng.integers(10, 41, size=m)
        genes = np.sort(np.argpartition(rng.random((m, n_genes)), 40, axis=1)[:, :40], axis=1)
        keep = np.arange(40)[None, :] < k[:, None]
        # Keep the first k of the 40 chosen genes of each row (columns stay sorted).
        rows = np.repeat(np.arange(m), keep.sum(1))
        cols = genes[keep]
        vals = rng.integers(1, 30, size=len(cols)).astype(np.float32)
        chunks.append(sparse.csr_matrix((vals, (rows, cols)), shape=(m, n_genes)))
    x = sparse.vstack(chunks, format="csr")
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)


def bench_memory(args) -> dict:
    """Peak RSS of embedding each atlas size, in fresh processes."""
    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        train = tmp / "train.h5ad"
        write_atlas(train, 2000, seed=1)
        model = tmp / "model"
        subprocess.run(
            _healthfm("pretrain", "singlecell", train, "--out", model, "--steps", "2",
                      "--batch-size", "8", "--eval-every", "0"),
            env=_env(), check=True, capture_output=True,
        )  # fmt: skip
        for n in args.cells:
            data = tmp / f"atlas{n}.h5ad"
            t = time.perf_counter()
            write_atlas(data, n)
            made = time.perf_counter() - t
            # A fresh interpreter per size (RUSAGE_CHILDREN keeps the largest child's).
            cmd = [
                sys.executable,
                str(Path(__file__)),
                "_rss",
                "--",
                *_healthfm("embed", model, data, "--out", tmp / f"emb{n}.h5ad", "--device", "cpu"),
            ]
            done = subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True)
            rss, seconds = map(float, done.stdout.strip().splitlines()[-1].split())
            size = data.stat().st_size / 2**20
            out[n] = rss
            print(
                f"{n:>9,} cells ({size:,.0f} MiB .h5ad, written in {made:.0f} s): peak RSS "
                f"{rss:,.0f} MiB, {seconds:.0f} s ({n / seconds:,.0f} cells/s end to end)",
                flush=True,
            )
            data.unlink()
            (tmp / f"emb{n}.h5ad").unlink()
    sizes = sorted(out)
    if len(sizes) > 1:
        print(
            f"peak RSS {sizes[-1]:,} ÷ {sizes[0]:,} cells: {out[sizes[-1]] / out[sizes[0]]:.2f}× "
            f"for {sizes[-1] / sizes[0]:.0f}× the cells"
        )
    return out


def _rss_main(cmd: list[str]) -> None:
    # Run cmd as our only child and print its peak RSS (MiB) and wall seconds.
    import resource

    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{usage.ru_maxrss / 1024:.1f} {time.perf_counter() - t:.1f}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_rss":
        return _rss_main(sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["speed", "processes", "memory"])
    parser.add_argument("--modalities", nargs="+", default=["singlecell", "dna", "ehr", "tiles"])
    parser.add_argument("--n", type=int, default=512, help="single-cell and DNA samples")
    parser.add_argument("--n-ehr", type=int, default=128, help="EHR subjects (long timelines)")
    parser.add_argument("--n-tiles", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="the reference's batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--rows", type=int, default=30_000, help="processes: DNA sequences")
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--tmp", default=None, help="memory: where the atlases are written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, {device}, preset {args.preset}")
    if "speed" in args.parts:
        print(f"speed: median of {args.rounds} rounds; reference batch {args.batch}")
        for name in args.modalities:
            rows = bench_speed(name, args, device)
            fp32 = {r["method"]: r["items_per_s"] for r in rows if r["dtype"] == "fp32"}
            print_speed(rows, fp32)
    if "processes" in args.parts:
        bench_processes(args)
    if "memory" in args.parts:
        bench_memory(args)
    return None


if __name__ == "__main__":
    main()
