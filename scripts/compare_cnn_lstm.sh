#!/usr/bin/env bash
# The paper's experiment on a CPU, in one command: train the CNN-LSTM and the competitive CNN with the same corpus,
# split, recipe and seed, then compare them on the same test images (scripts/compare_models.py).
#
#   scripts/compare_cnn_lstm.sh                       # runs/compare/{cnn-lstm,cnn-dense}, ../shared/data/cxr3
#   OUT=runs/c DATA_DIR=.data/cxr3-corpus scripts/compare_cnn_lstm.sh --num_train_epochs 2   # extra args: both runs
#
# Each run is scripts/train_cpu.sh in the foreground (WAIT=1), so an interrupted command resumes from the last
# checkpoint when given again; a run whose final folder exists is not redone. The recipes: train/configs/lungs_cpu.json
# and train/configs/lungs_cpu_cnn.json (identical but for head_type; LSTM_CONFIG / CNN_CONFIG replace them, and each
# run is given its --head_type). About 18 min each with native bf16 on 2 cores, several times that in fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/compare}
DATA_DIR=${DATA_DIR:-../shared/data/cxr3}
PYTHON=${PYTHON:-python}
LSTM_CONFIG=${LSTM_CONFIG:-train/configs/lungs_cpu.json}
CNN_CONFIG=${CNN_CONFIG:-train/configs/lungs_cpu_cnn.json}
for pair in "cnn-lstm:lstm:$LSTM_CONFIG" "cnn-dense:dense:$CNN_CONFIG"; do
    IFS=: read -r name head config <<< "$pair"
    if [ -f "$OUT/$name/final/report/metrics.json" ]; then
        echo "$name: $OUT/$name/final exists, not retrained"
        continue
    fi
    echo "$name: training ($config), log $OUT/$name/run.log"
    WAIT=1 OUTPUT_DIR=$OUT/$name CONFIG=$config DATA_DIR=$DATA_DIR PYTHON=$PYTHON scripts/train_cpu.sh --head_type "$head" "$@" || {
        echo "$name: training failed; see $OUT/$name/run.log" >&2; exit 1; }
done
corpus=$DATA_DIR  # a raw cxr3-layout folder was built into the first run's corpus/
[ -f "$DATA_DIR/dataset_dict.json" ] || corpus=$OUT/cnn-lstm/corpus
"$PYTHON" scripts/compare_models.py --cnn_lstm "$OUT/cnn-lstm/final" --cnn "$OUT/cnn-dense/final" --data_dir "$corpus"
