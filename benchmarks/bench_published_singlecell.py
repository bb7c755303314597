"""Embedding throughput of healthfm's native Geneformer and scGPT against their reference
implementations, at the published shapes, with random weights shared by both sides.

* Geneformer V1-10M (6 layers, 256 wide, 4 heads, 2,048 tokens, vocab 25,426) and
  V2-104M (12 layers, 512 wide, 8 heads, 4,096 tokens, vocab 20,275), from the authors'
  config.json files: ours (``GeneformerEncoder.embed``: the second-to-last layer's states,
  so one layer fewer is run) vs ``transformers.BertModel(output_hidden_states=True)`` and
  ``hidden_states[-2]``, the way ``EmbExtractor`` calls it.
* scGPT_human (12 layers, 512 wide, 8 heads, d_hid 512, 1,200 tokens, vocab 60,697): ours
  vs the authors' non-flash ``TransformerModel._encode`` (``nn.TransformerEncoder``).

fp32 and bf16 autocast; the two sides alternate batch by batch and the median time per
batch over ``--rounds`` is reported, with cells/s and the ratio ours / reference (and, for
Geneformer, the ratio per layer run).

    python benchmarks/bench_published_singlecell.py [--models geneformer-v1 geneformer-v2 scgpt]
        [--batch 8] [--rounds 5] [--seq N (override the published context)] [--device cuda]

Needs ``transformers`` (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from healthfm.encoders.geneformer import GeneformerEncoder, GeneformerTokenizer
from healthfm.encoders.published import load_weights
from healthfm.encoders.scgpt import ScGPTEncoder, ScGPTTokenizer

GENEFORMER = {
    "geneformer-v1": dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=2048, vocab_size=25426, hidden_act="relu", layer_norm_eps=1e-12,
    ),
    "geneformer-v2": dict(
        hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=1024,
        max_position_embeddings=4096, vocab_size=20275, hidden_act="relu", layer_norm_eps=1e-12,
    ),
}  # fmt: skip
SCGPT = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12, "n_vocab": 60694}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _race(fns: dict, batches: list, device, bf16: bool, rounds: int) -> dict[str, float]:
    """Median seconds per batch of each function, alternating between them."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for fn in fns.values():  # warm-up
            fn(batches[0])
        _sync(device)
        for r in range(rounds):
            for name, fn in fns.items():
                b = batches[r % len(batches)]
                t0 = time.perf_counter()
                fn(b)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def geneformer_case(name: str, args, device) -> tuple[dict, list, int, int]:
    import transformers

    cfg = dict(GENEFORMER[name])
    seq = args.seq or cfg["max_position_embeddings"]
    v2 = name.endswith("v2")
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if v2 else [])
    tokens = {s: i for i, s in enumerate(specials)}
    tokens |= {f"ENSG{i:011d}": i for i in range(len(specials), cfg["vocab_size"])}
    tok = GeneformerTokenizer(tokens, {g: 1.0 for g in tokens if not g.startswith("<")})
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False)
    ours = GeneformerEncoder(cfg, tok, folder=".", model_hash=None)
    load_weights(
        ours,
        ref.state_dict(),
        "BertModel",
        ignore=("embeddings.position_ids", "embeddings.token_type_ids"),
    )
    ref, ours = ref.eval().to(device), ours.eval().to(device)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(len(specials), cfg["vocab_size"], (args.batch, seq), generator=gen)
        if v2:
            ids[:, 0], ids[:, -1] = tokens["<cls>"], tokens["<eos>"]
        mask = torch.ones_like(ids, dtype=torch.bool)
        batches.append({"ids": ids.to(device), "attention_mask": mask.to(device)})

    def theirs(b):
        out = ref(
            input_ids=b["ids"], attention_mask=b["attention_mask"].long(), output_hidden_states=True
        )
        return out.hidden_states[-2].mean(1)

    fns = {"ours": lambda b: ours.embed(b), "reference": theirs}
    return fns, batches, cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"]


class _ScGPTReference(nn.Module):
    """scgpt/model/model.py ``_encode`` (use_fast_transformer=False), eval mode."""

    def __init__(self, ntoken: int, d: int, nhead: int, d_hid: int, nlayers: int) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(ntoken, d)
        self.encoder.enc_norm = nn.LayerNorm(d)
        self.value_encoder = nn.Module()
        self.value_encoder.linear1 = nn.Linear(1, d)
        self.value_encoder.linear2 = nn.Linear(d, d)
        self.value_encoder.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, nhead, d_hid, 0.2, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)

    def forward(self, ids, values, pad):
        v = self.value_encoder
        x = self.encoder.enc_norm(self.encoder.embedding(ids))
        x = x + v.norm(v.linear2(torch.relu(v.linear1(values.clamp(max=512).unsqueeze(-1)))))
        out = self.transformer_encoder(x, src_key_padding_mask=pad)
        return torch.nn.functional.normalize(out[:, 0], dim=-1)


def scgpt_case(args, device) -> tuple[dict, list, int, int]:
    seq = args.seq or 1200
    vocab = {f"G{i}": i for i in range(SCGPT["n_vocab"])}
    tok = ScGPTTokenizer(vocab, max_length=seq)
    model_args = {k: SCGPT[k] for k in ("embsize", "nheads", "d_hid", "nlayers")}
    ours = ScGPTEncoder(model_args, tok, folder=".", model_hash=None)
    torch.manual_seed(0)
    ref = _ScGPTReference(
        tok.vocab_size, *(SCGPT[k] for k in ("embsize", "nheads", "d_hid", "nlayers"))
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.eval().to(device), ours.eval().to(device)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, SCGPT["n_vocab"], (args.batch, seq), generator=gen)
        ids[:, 0] = tok.cls_id
        values = torch.randint(1, 51, (args.batch, seq), generator=gen).float()
        values[:, 0] = -2.0
        mask = torch.ones_like(ids, dtype=torch.bool)
        batches.append(
            {"ids": ids.to(device), "values": values.to(device), "attention_mask": mask.to(device)}
        )
    fns = {
        "ours": lambda b: ours.embed(b),
        "reference": lambda b: ref(b["ids"], b["values"], ~b["attention_mask"]),
    }
    return fns, batches, SCGPT["nlayers"], SCGPT["nlayers"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["geneformer-v1", "geneformer-v2", "scgpt"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq", type=int, default=None, help="tokens per cell (default: published)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", action="store_true", help="fp32 only")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, batch {args.batch}, rounds {args.rounds}, torch {torch.__version__}")
    for name in args.models:
        fns, batches, ours_layers, ref_layers = (
            scgpt_case(args, device) if name == "scgpt" else geneformer_case(name, args, device)
        )
        seq = batches[0]["ids"].shape[1]
        for bf16 in (False, True) if not args.no_bf16 else (False,):
            t = _race(fns, batches, device, bf16, args.rounds)
            ratio = t["reference"] / t["ours"]
            per_layer = ratio * ours_layers / ref_layers
            print(
                f"{name:14s} seq {seq:5d} {'bf16' if bf16 else 'fp32'}: "
                f"ours {args.batch / t['ours']:8.3g} cells/s, reference {args.batch / t['reference']:8.3g} "
                f"cells/s, speed-up {ratio:5.2f}x"
                + (f" ({per_layer:.2f}x per layer run)" if ours_layers != ref_layers else "")
            )


if __name__ == "__main__":
    main()
