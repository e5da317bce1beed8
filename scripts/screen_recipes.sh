#!/usr/bin/env bash
# Screen the anti-shortcut levers of issue 17 at 128 px (train/configs/screen_128.json), one recipe after another,
# each scored on VALIDATION only: its report/ (with the shortcut audit that every run writes) is the validation
# split, and the test split is never touched here. Resumable: a finished recipe is skipped, an interrupted one
# continues from its last epoch. Runs in the foreground; start it under nohup for the background:
#
#   nohup scripts/screen_recipes.sh > runs/screen/queue.log 2>&1 &
#   RECIPES="baseline crop" scripts/screen_recipes.sh     # a subset, in this order
#
# Each recipe is a name and its flags on top of the screening config (below). Results: runs/screen/<name>/final/
# (report and audit on validation). Also here, not in the default list:
# - lso_old / lso_new: the leave-source-out check, the old and the chosen recipe trained without the actualmed and
#   figure1 collections; score them afterwards on those collections only (README, "Training against shortcuts"):
#   python scripts/evaluate_checkpoint.py --model runs/screen/lso_new/final --data_dir HELD_OUT_FOLDER
# - data_hidden: the data-level shortcut check (Maguolo & Nanni): lung fields hidden in every split.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-.data/cxr3-corpus}
CONFIG=${CONFIG:-train/configs/screen_128.json}
ROOT=${ROOT:-runs/screen}
PYTHON=${PYTHON:-python}
declare -A FLAGS=(
    [baseline]=""
    [crop]="--crop_to_lungs true"
    [swap]="--outside_lung_swap 0.5"
    [crop_swap]="--crop_to_lungs true --outside_lung_swap 0.5"
    [crop_swap_adv]="--crop_to_lungs true --outside_lung_swap 0.5 --source_adversary_weight 0.3"
    [swap_adv]="--outside_lung_swap 0.5 --source_adversary_weight 0.3"
    [crop_swap8_adv]="--crop_to_lungs true --outside_lung_swap 0.8 --source_adversary_weight 0.3"
    [lso_old]="--exclude_sources actualmed,figure1"
    [lso_new]="--exclude_sources actualmed,figure1 --crop_to_lungs true --outside_lung_swap 0.5 --source_adversary_weight 0.3"
    [data_hidden]="--hide_lungs true --shortcut_audit false"
)
RECIPES=${RECIPES:-"baseline crop crop_swap crop_swap_adv swap_adv"}
for name in $RECIPES; do
    [ -n "${FLAGS[$name]+set}" ] || { echo "unknown recipe $name (known: ${!FLAGS[*]})" >&2; exit 2; }
    out=$ROOT/$name
    if [ ! -f "$out/final/config.json" ]; then
        echo "$(date '+%F %T') training $name: ${FLAGS[$name]}"
        # shellcheck disable=SC2086
        WAIT=1 OUTPUT_DIR=$out CONFIG=$CONFIG DATA_DIR=$DATA_DIR PYTHON=$PYTHON scripts/train_cpu.sh \
            --test_split validation ${FLAGS[$name]} || { echo "$name failed: $out/run.log" >&2; continue; }
    fi
done
echo "$(date '+%F %T') screening done"
