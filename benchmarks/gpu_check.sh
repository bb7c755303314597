#!/usr/bin/env bash
# The GPU check, under 8 minutes on one GPU: pretraining tokens/s and MFU of small and base
# (bf16) vs HF BertForMaskedLM, embedding vs HF BertModel/ViTModel, one-GPU FSDP pretraining.
#   bash benchmarks/gpu_check.sh            (from the repository root, with the venv active
#                                             or PY=path/to/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH=src:benchmarks
echo "== 1. pretraining step: small and base, bf16, vs HF BertForMaskedLM"
timeout 240 "$PY" benchmarks/gpu_check.py --presets small base --seq 512 --batch 32
echo "== 2. embedding vs HF (single-cell, DNA, tiles), bf16 and fp32"
timeout 150 "$PY" benchmarks/bench_embed.py speed --device cuda --modalities singlecell dna tiles --n 2048 --n-tiles 512 --rounds 2
echo "== 3. one-GPU FSDP pretraining (torchrun, bf16), the real command"
out=$(mktemp -d)
timeout 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m healthfm pretrain dna \
  src/healthfm/data/dna/splice.tsv --out "$out/model" --preset small --steps 40 --batch-size 64 \
  --bf16 --strategy fsdp --eval-every 20 && "$PY" - "$out/model" <<'PYEOF'
import json, sys
info = json.load(open(f"{sys.argv[1]}/training_info.json"))
print(f"fsdp: {info['steps']} steps, {info['tokens_per_s']:.0f} tokens/s, val loss {info['val_loss']:.4f}, world {info['world_size']}")
PYEOF
rm -rf "$out"
