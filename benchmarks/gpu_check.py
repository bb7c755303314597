"""The GPU check: pretraining tokens/s and MFU of ``small`` and ``base`` under bf16 against
Hugging Face ``BertForMaskedLM`` of the same shapes, on the same GPU, in one run.

    python benchmarks/gpu_check.py [--presets small base] [--seq 512] [--batch 32] [--device cuda]

Full training steps (forward, masked-token loss, backward, AdamW) of both models alternate
step by step; MFU is model FLOPs/s (6 × block parameters per token + attention, the
masked-token head at the targets only, as ``train_throughput.py`` counts) over the GPU's
dense bf16 matmul peak measured in the same run. ``benchmarks/gpu_check.sh`` runs this,
the embedding benchmark and a one-GPU FSDP pretraining run within 8 minutes.
Needs ``transformers`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_backbone import bert_step, make_batches, ours_step
from train_throughput import flops_per_step, matmul_peak

from healthfm.model import FoundationModel, ModelConfig
from healthfm.model.config import PRESETS


def main() -> None:
    from transformers import BertConfig, BertForMaskedLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4102)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = matmul_peak(torch.bfloat16, device.type)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in make_batches(args.steps, args.batch, args.seq, args.vocab)
    ]
    tokens = args.steps * args.batch * args.seq
    for preset in args.presets:
        p = PRESETS[preset]
        torch.manual_seed(0)
        config = ModelConfig.from_preset(
            preset, modality="bench", vocab_size=args.vocab, max_len=max(512, args.seq)
        )
        ours = FoundationModel(config).to(device)
        bert = BertForMaskedLM(
            BertConfig(
                vocab_size=args.vocab,
                hidden_size=p["d_model"],
                num_hidden_layers=p["n_layers"],
                num_attention_heads=p["n_heads"],
                intermediate_size=p["d_ff"],
                max_position_embeddings=max(512, args.seq),
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                attn_implementation="sdpa",
            )
        ).to(device)
        steps = {
            "ours": ours_step(ours.train(), torch.optim.AdamW(ours.parameters(), lr=1e-4)),
            "bert": bert_step(bert.train(), torch.optim.AdamW(bert.parameters(), lr=1e-4)),
        }

        def timed(step, batch) -> float:
            sync()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                step(batch)
            sync()
            return time.perf_counter() - t

        for step in steps.values():
            for batch in batches[:2]:
                timed(step, batch)
        times = {k: [] for k in steps}
        for _ in range(args.rounds):
            total = dict.fromkeys(steps, 0.0)
            for batch in batches:
                for k, step in steps.items():
                    total[k] += timed(step, batch)
            for k in steps:
                times[k].append(total[k])
        rate = {k: tokens / statistics.median(t) for k, t in times.items()}
        n_targets = int(sum(int((b["labels"] >= 0).sum()) for b in batches) / len(batches))
        flops = flops_per_step(config, np.full(args.batch, args.seq), n_targets)
        mfu = flops * rate["ours"] / (args.batch * args.seq) / peak
        print(
            f"{preset}: bf16 ours {rate['ours']:,.0f} tokens/s, HF BertForMaskedLM "
            f"{rate['bert']:,.0f} tokens/s, ratio {rate['ours'] / rate['bert']:.2f}x, "
            f"MFU {mfu:.0%} (batch {args.batch} x {args.seq})",
            flush=True,
        )
        del ours, bert, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
