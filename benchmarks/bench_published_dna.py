"""Nucleotide Transformer embedding throughput at the published shapes (random weights):
healthfm's native encoder vs transformers' ``EsmModel`` on the same weights and inputs,
fp32 and bf16 autocast.

Shapes (``config.json`` of the published folders, where a config was read; the others
from the paper's model table, marked ``*``):

=============  ======  ======  =====  =====  ==========  ========
model          layers  hidden  heads  FFN    positions   vocab
=============  ======  ======  =====  =====  ==========  ========
v1-500m        24      1280    20     5120   absolute    4105
v2-50m         12      512     16     2048   rotary+GLU  4107
v2-100m        22      512     16     2048   rotary+GLU  4107
v2-250m        24*     768     16*    3072*  rotary+GLU  4107
v2-500m        29*     1024    16*    4096*  rotary+GLU  4107
=============  ======  ======  =====  =====  ==========  ========

The reference for v1 is ``EsmModel`` itself (the architecture NT v1 folders load into).
For v2 it is ``EsmModel`` (rotary) with each layer's FFN replaced by the v2 remote code's
gated, bias-free one (re-typed here, never imported), so both sides compute the same
network; the outputs' largest difference is printed with each row.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_published_dna.py [--models v2-50m
v1-500m] [--tokens 1000] [--batch 8] [--n 32]``. On a CPU use small ``--n``/``--tokens``.
Numbers are ratios within one run on one machine, not promises.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from healthfm.encoders.nucleotide_transformer import (
    NTConfig,
    NucleotideTransformer,
    NucleotideTransformerTokenizer,
)

SHAPES = {
    "v1-500m": (24, 1280, 20, 5120, False),
    "v2-50m": (12, 512, 16, 2048, True),
    "v2-100m": (22, 512, 16, 2048, True),
    "v2-250m": (24, 768, 16, 3072, True),
    "v2-500m": (29, 1024, 16, 4096, True),
}
_KMERS = ["".join(p) for p in itertools.product("ATCG", repeat=6)]


def build(name: str, device: torch.device):
    """(ours, reference) with the same random weights, on ``device``, in eval mode."""
    import transformers

    layers, hidden, heads, ffn, v2 = SHAPES[name]
    if v2:
        vocab = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>", *_KMERS, *"ATCGN"]
    else:
        vocab = ["<unk>", "<pad>", "<mask>", "<cls>", *_KMERS, *"ATCGN", "<eos>", "<bos>"]
    n_vocab = 4107 if v2 else 4105
    cfg = transformers.EsmConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        pad_token_id=1,
        mask_token_id=2,
        max_position_embeddings=2050 if v2 else 1002,
        position_embedding_type="rotary" if v2 else "absolute",
        token_dropout=not v2,
        emb_layer_norm_before=False,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ref = transformers.EsmModel(cfg, add_pooling_layer=False)
    if v2:
        for layer in ref.encoder.layer:
            layer.intermediate = _Gated(hidden, ffn)
            layer.output.dense = torch.nn.Linear(ffn, hidden, bias=False)
    ours_cfg = NTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        vocab_size=n_vocab,
        pad_token_id=1,
        mask_token_id=2,
        max_position_embeddings=cfg.max_position_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        layer_norm_eps=1e-12,
        emb_layer_norm_before=False,
        token_dropout=not v2,
        glu=v2,
        ffn_bias=not v2,
    )
    tok = NucleotideTransformerTokenizer(vocab, ours_cfg.max_tokens, n_vocab)
    ours = NucleotideTransformer(ours_cfg, tok, f"nt-{name}", ".", None)
    state = {k: v for k, v in ref.state_dict().items() if "inv_freq" not in k}
    ours.load_state_dict({k: v for k, v in state.items() if not k.startswith("contact_head")})
    return ours.to(device).eval(), ref.to(device).eval()


class _Gated(torch.nn.Module):
    # The v2 remote code's EsmIntermediate: silu(x1) * x2 of a bias-free 2 x FFN projection.
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(hidden, 2 * ffn, bias=False)

    def forward(self, x):
        x1, x2 = self.dense(x).chunk(2, dim=-1)
        return torch.nn.functional.silu(x1) * x2


def _mean(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@torch.inference_mode()
def throughput(fn, batches, device, bf16: bool) -> tuple[float, torch.Tensor]:
    """Sequences per second of ``fn`` over ``batches`` (after one warm-up batch)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        fn(*batches[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, outs = time.perf_counter(), []
        for ids, mask in batches:
            outs.append(fn(ids, mask).float())
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return sum(len(b[0]) for b in batches) / seconds, torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's context)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=32, help="sequences timed per setting")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{'model':9} {'tokens':>6} {'dtype':5} {'ours seq/s':>10} {'ref seq/s':>10} {'ratio':>6} {'max|diff|':>9}"
    )
    for name in args.models:
        ours, ref = build(name, device)
        tokens = args.tokens or ours.max_len
        g = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(max(1, args.n // args.batch) + 1):  # +1: the warm-up batch
            ids = torch.randint(6, 4100, (args.batch, tokens), generator=g)
            ids[:, 0] = 3  # <cls>
            # Ragged lengths, as real batches: the last rows are padded.
            lengths = torch.randint(tokens // 2, tokens + 1, (args.batch,), generator=g)
            mask = torch.arange(tokens)[None] < lengths[:, None]
            batches.append((ids.to(device), mask.to(device)))

        def run_ours(ids, mask, ours=ours):
            return ours.embed({"ids": ids, "attention_mask": mask})

        def run_ref(ids, mask, ref=ref):
            hidden = ref(
                input_ids=torch.where(mask, ids, 1), attention_mask=mask.long()
            ).last_hidden_state
            return _mean(hidden, mask)

        for bf16 in (False, True):
            a, out_a = throughput(run_ours, batches, device, bf16)
            b, out_b = throughput(run_ref, batches, device, bf16)
            diff = (out_a - out_b).abs().max().item()
            dtype = "bf16" if bf16 else "fp32"
            print(
                f"{name:9} {tokens:>6} {dtype:5} {a:>10.2f} {b:>10.2f} {a / b:>6.2f} {diff:>9.2e}"
            )
        del ours, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
