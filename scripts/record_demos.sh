#!/usr/bin/env bash
# Record the numbers a refactor must keep: the four quick demos, full and LoRA fine-tuning
# (2 epochs) of the DNA demo model, and `evaluate --finetuned`. Run it on the old and on the
# new tree, then compare each results.json with scripts/compare_results.py.
#   usage: scripts/record_demos.sh OUT_DIR     (from the repository root, venv in .venv)
set -euo pipefail
OUT=${1:?usage: scripts/record_demos.sh OUT_DIR}
HF=${HEALTHFM:-.venv/bin/healthfm}
SPLICE=src/healthfm/data/dna/splice.tsv
mkdir -p "$OUT"
for m in dna singlecell ehr pathology; do
  "$HF" demo --modality "$m" --quick --out "$OUT/demo_$m" > "$OUT/demo_$m.log" 2>&1
done
"$HF" finetune "$OUT/demo_dna/model" "$SPLICE" --label-column label --out "$OUT/ft_full" \
  --epochs 2 --seed 0 > "$OUT/ft_full.log" 2>&1
"$HF" finetune "$OUT/demo_dna/model" "$SPLICE" --label-column label --out "$OUT/ft_lora" \
  --lora --epochs 2 --seed 0 > "$OUT/ft_lora.log" 2>&1
"$HF" evaluate "$OUT/demo_dna/model" "$SPLICE" --label-column label --out "$OUT/eval_ft" \
  --finetuned "$OUT/ft_full" "$OUT/ft_lora" --n-boot 200 > "$OUT/eval_ft.log" 2>&1
echo "results in $OUT: demo_*/results.json, demo_pathology/{tiles_eval,mil/eval}/results.json, eval_ft/results.json"
