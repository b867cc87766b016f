#!/usr/bin/env bash
# The real-data benchmark runs behind docs/BENCHMARKS.md. Run from the repository root:
#   bash scripts/run_benchmarks.sh [brain|brain-extra-a|brain-extra-b|fundus|click-label|sweep|sweep-baselines|brain-tuned]...
# Results: results/<name>.json and docs/figures/<name>.png; tables: python scripts/tables.py.
set -euo pipefail
PY=${PYTHON:-python}
DATA=${OAIMS_DATA:-../shared/data}
THREADS=${THREADS:-1}
mkdir -p results docs/figures
BASELINES=frozen,ia+sa,tsca,ce-pi,ent-pi,pi,pi+mi
BRAIN=(--model brain-lesion-flair --min-foreground 50 --max-images 30 --threads "$THREADS")
BRAIN_EXTRA=(--model brain-lesion-flair --min-foreground 50 --max-images 20 --threads "$THREADS" --dataset "$DATA/Dataset002_BraTS18_T1")
FUNDUS=(--model fundus-disc-cup --max-images 30 --threads "$THREADS")
HELD_OUT=("${BRAIN_EXTRA[@]}" --split Tr)  # shifted brain slices the tables do not use, for choices made before them
ev() { local name=$1; shift; $PY -m OAIMSSegment evaluate "$@" --json "results/$name.json" --plot "docs/figures/$name.png"; }
sweep_lr() {  # sweep_lr NAME METHODS: the adaptation learning-rate sweep on HELD_OUT, T = 5, one seed
  local lr
  for lr in 1e-5 3e-5 1e-4 3e-4 1e-3; do
    ev "sweep/$1-lr-$lr" "${HELD_OUT[@]}" --methods "$2" --clicks 5 --lr "$lr"
  done
}
tuned() {  # tuned NAME DATASET METHODS LR: a table row (10 clicks, 3 seeds) at a method's own rate
  ev "$1-tuned-lr-$4" "${BRAIN[@]}" --dataset "$DATA/$2" --methods "$3" --clicks 10 --seeds 3 --lr "$4"
}
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(brain fundus)
for part in "${parts[@]}"; do
  case "$part" in
    sweep)  # learning-rate sweep of PI+MI on shifted brain data the tables do not use (T1 imagesTr; one seed, T = 5)
      ev sweep/brain-t1-tr-frozen "${HELD_OUT[@]}" --methods frozen --clicks 5
      sweep_lr brain-t1-tr pi+mi ;;
    sweep-baselines)  # the same sweep for the baselines (the tables run them at PI+MI's default rate)
      sweep_lr brain-t1-tr-baselines ia+sa,tsca,ce-pi,ent-pi ;;
    brain-tuned)  # T1 test rows with each method at its best rate in the sweeps above (5 clicks; a tie goes to
                  # the smaller rate); pi+mi's best is the default (brain-t1). Rates of the brain model of 2026-11-26
      tuned brain-t1 Dataset002_BraTS18_T1 ia+sa,ce-pi 1e-5
      tuned brain-t1 Dataset002_BraTS18_T1 tsca 1e-4
      tuned brain-t1 Dataset002_BraTS18_T1 ent-pi 3e-4 ;;
    brain)
      ev brain-t1 "${BRAIN[@]}" --dataset "$DATA/Dataset002_BraTS18_T1" --methods "$BASELINES" --clicks 10 --seeds 3
      ev brain-flair-control "${BRAIN[@]}" --dataset "$DATA/Dataset001_BraTS18_FLAIR" --methods frozen,pi,pi+mi --clicks 10 --seeds 3 ;;
    brain-extra-a)  # Table 4 (T = 3, 5) and Table 11 (wrong clicks); 20 slices
      ev brain-t1-T3 "${BRAIN_EXTRA[@]}" --methods frozen,pi,pi+mi --clicks 3 --seeds 3
      ev brain-t1-T5 "${BRAIN_EXTRA[@]}" --methods frozen,pi,pi+mi --clicks 5 --seeds 3
      ev brain-t1-wrong40 "${BRAIN_EXTRA[@]}" --methods frozen,pi+mi --clicks 10 --seeds 3 --wrong-fraction 0.4
      ev brain-t1-first4wrong "${BRAIN_EXTRA[@]}" --methods frozen,pi+mi --clicks 10 --seeds 3 --first-wrong 4 ;;
    brain-extra-b)  # Tables 5/7 (CCG and MI/PI ablations), Table 10 (worst first), Table 14 (NoC@80, 20 clicks)
      ev brain-t1-ablation "${BRAIN_EXTRA[@]}" --methods mi,pi+mi,pi+mi/no-class,pi+mi/uniform,pi+mi/sigma0 --clicks 10 --seeds 3
      ev brain-t1-worstfirst "${BRAIN_EXTRA[@]}" --methods frozen,pi+mi --clicks 10 --seeds 3 --order worst-first
      ev brain-t1-noc "${BRAIN_EXTRA[@]}" --methods frozen,pi+mi --clicks 20 --seeds 3 ;;
    fundus)
      ev fundus-origa "${FUNDUS[@]}" --dataset "$DATA/Dataset004_ORIGA" --methods "$BASELINES" --clicks 10 --seeds 3
      ev fundus-drishti-control "${FUNDUS[@]}" --dataset "$DATA/Dataset003_DrishtiGS" --methods frozen,pi,pi+mi --clicks 10 --seeds 3 ;;
    click-label)  # our MI extension pi+mi/click-label next to pi+mi (BENCHMARKS section 9.1); first the held-out T1 imagesTr run that chose it
      ev sweep/brain-t1-tr-click-label "${HELD_OUT[@]}" --methods ia+sa,tsca,pi+mi,pi+mi/click-label --clicks 10
      ev brain-t1-click-label "${BRAIN[@]}" --dataset "$DATA/Dataset002_BraTS18_T1" --methods frozen,pi+mi,pi+mi/click-label --clicks 10 --seeds 3
      ev brain-flair-control-click-label "${BRAIN[@]}" --dataset "$DATA/Dataset001_BraTS18_FLAIR" --methods frozen,pi+mi,pi+mi/click-label --clicks 10 --seeds 3
      ev brain-t1-wrong40-click-label "${BRAIN_EXTRA[@]}" --methods pi+mi,pi+mi/click-label --clicks 10 --seeds 3 --wrong-fraction 0.4
      ev brain-t1-noc-click-label "${BRAIN_EXTRA[@]}" --methods pi+mi/click-label --clicks 20 --seeds 3
      ev fundus-origa-click-label "${FUNDUS[@]}" --dataset "$DATA/Dataset004_ORIGA" --methods pi+mi,pi+mi/click-label --clicks 10 --seeds 3 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
