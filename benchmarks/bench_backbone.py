"""Training throughput of the healthfm backbone vs Hugging Face ``BertForMaskedLM``.

Same width, depth, heads, MLP size, vocabulary and batches; a full training step
(forward, masked-token loss, backward, AdamW) in fp32 and under bf16 autocast. The two
models alternate step by step so that background load affects both sides alike; the median
over rounds is reported, with the ratio ours / peer.

    python benchmarks/bench_backbone.py [--presets tiny small] [--vocab 4102] [--seq 64]

Needs ``transformers`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from healthfm.model import FoundationModel, ModelConfig
from healthfm.model.config import PRESETS
from healthfm.train.objectives import masked_tokens


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (batch, seq), generator=gen)
        ids[:, 0] = 2
        b = {"ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.bool)}
        out.append(masked_tokens(b, gen, vocab, 0.15))
    return out


def ours_step(model, opt):
    def step(batch):
        loss, _ = model.pretraining_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bert_step(model, opt):
    def step(batch):
        out = model(
            input_ids=batch["ids"],
            attention_mask=batch["attention_mask"].long(),
            labels=batch["labels"],
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, batch, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        step(batch)
    return time.perf_counter() - start


def main() -> None:
    from transformers import BertConfig, BertForMaskedLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument(
        "--vocab", type=int, default=4102, help="vocabulary (4102 = DNA 6-mers + specials)"
    )
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = make_batches(args.steps, args.batch, args.seq, args.vocab)
    tokens = args.steps * args.batch * args.seq
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} × {args.seq} tokens, "
        f"vocab {args.vocab}, {args.steps} steps per round, median of {args.rounds} rounds"
    )
    print(f"{'preset':<7}{'dtype':<6}{'ours tok/s':>12}{'BERT tok/s':>12}{'ratio':>8}")
    for preset in args.presets:
        p = PRESETS[preset]
        torch.manual_seed(0)
        ours = FoundationModel(
            ModelConfig.from_preset(
                preset, modality="bench", vocab_size=args.vocab, max_len=max(512, args.seq)
            )
        )
        bert = BertForMaskedLM(
            BertConfig(
                vocab_size=args.vocab,
                hidden_size=p["d_model"],
                num_hidden_layers=p["n_layers"],
                num_attention_heads=p["n_heads"],
                intermediate_size=p["d_ff"],
                max_position_embeddings=512,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                attn_implementation="sdpa",
            )
        )
        steps = {
            "ours": ours_step(ours.train(), torch.optim.AdamW(ours.parameters(), lr=1e-4)),
            "bert": bert_step(bert.train(), torch.optim.AdamW(bert.parameters(), lr=1e-4)),
        }
        for bf16 in (False, True):
            for step in steps.values():  # warm-up (allocator, autocast caches)
                for batch in batches[:2]:
                    timed(step, batch, bf16)
            # Alternate the two models step by step, so background load hits both alike.
            times = {name: [] for name in steps}
            for _ in range(args.rounds):
                total = dict.fromkeys(steps, 0.0)
                for batch in batches:
                    for name, step in steps.items():
                        total[name] += timed(step, batch, bf16)
                for name in steps:
                    times[name].append(total[name])
            rate = {name: tokens / statistics.median(t) for name, t in times.items()}
            print(
                f"{preset:<7}{'bf16' if bf16 else 'fp32':<6}{rate['ours']:>12,.0f}{rate['bert']:>12,.0f}"
                f"{rate['ours'] / rate['bert']:>7.2f}×",
                flush=True,
            )


if __name__ == "__main__":
    main()
