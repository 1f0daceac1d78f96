#!/bin/bash
# How much of the label survives the style network, and how far a style-trained model ignores style: the
# style_policies_office31 runs of the pastel rotation (policies none and style, seeds 0-2), each evaluated with
# --eval-only on its training domains' val images, clean and stylized (task.eval_stylized) at alpha 0, 0.5, 1.
# Prints "policy seed alpha top1"; every evaluation's folder is runs/probe/<policy>-s<seed>-<alpha>/.
# STYLE=<style checkpoint> probes another network (default the shipped one; folders runs/probe/<file stem>/...),
# POLICIES="none" probes only the clean-trained models.
#   bash scripts/style_label_probe.sh [runs/experiments/style_policies_office31]
#   STYLE=assets/style_lite0_v2.safetensors POLICIES=none bash scripts/style_label_probe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/experiments/style_policies_office31}
PY=${PYTHON:-.venv/bin/python}
STYLE=${STYLE:-assets/style_lite0.safetensors}
P=runs/probe
[ "$STYLE" = assets/style_lite0.safetensors ] || P=runs/probe/$(basename "$STYLE" .safetensors)
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
for policy in ${POLICIES:-none style}; do for seed in 0 1 2; do
  run=$R/test_domain-pastel__policy-$policy/seed$seed/classify
  [ -f "$run/best.safetensors" ] || { echo "$run: not finished, skipped" >&2; continue; }
  root=$("$PY" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['task']['root'])" "$run/config.yaml")
  for a in clean 0.0 0.5 1.0; do
    extra=(); [ "$a" = clean ] || extra=(task.eval_stylized=true "task.style_alpha=$a")
    out=$P/$policy-s$seed-$a
    mkdir -p "$P"
    [ -f "$out/results.json" ] || "$PY" -m finetune --eval-only --config configs/finetune/classification_synthetic.yaml \
      "model.init=$run/best.safetensors" model.vision.name=efficientnet_lite0 "task.root=$root" \
      "task.train_domains=[plain, striped]" "task.test_domains=[pastel]" "eval.splits=[val]" "run.seed=$seed" \
      "task.style_checkpoint=$STYLE" "${extra[@]}" "run.dir=$out" > "$out.log" 2>&1
    echo "$policy $seed $a $("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['splits']['val']['top1'])" "$out/results.json")"
  done
done; done
