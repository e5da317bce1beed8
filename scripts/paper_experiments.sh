#!/usr/bin/env bash
# The paper experiments of issue 6 in one command, ordered by value, each step saved and packed as it finishes.
#
# On the GPU machine (the repository there is a copy of the working tree; ../shared does not travel):
#   here, once:  mkdir -p .data && cp -r ../shared/data/cxr3 .data/cxr3          # ~40 MB, ignored by git
#                mkdir -p .whl && cp ../shared/wheels/py312/*.whl .whl/           # datasets, evaluate, captum, ...
#   device run:  DATA_DIR=.data/cxr3 bash scripts/paper_experiments.sh            # carry: [".data", ".whl"]
#   back here:   bash scripts/unpack_results.sh FILES_AT                          # the folder holding the parts (device tool reply)
# CPU dry run (tiny config, a few steps, CPU flags; what the tests run):
#   DRY_RUN=1 DATA_DIR=SOME_CXR3_FOLDER OUT=/tmp/out bash scripts/paper_experiments.sh
#
# Steps: (0) patient-disjoint corpus, pre-resized to 256 px; (1) final CNN-LSTM (paper.json) on train/validation,
# tested on test, shipped as checkpoints/cnn-lstm-cxr3 (float16, 15 MB shards, loads as float32) + its shortcut
# audit; (2) its 5-fold patient-grouped CV; (3) benchmark_train.py, Trainer vs plain loop; (4) the dense-head CNN
# (paper_cnn.json) final, compared with the CNN-LSTM (scripts/compare_models.py) (+ CV if time); (5) the leaky
# --protocol paper split once with the CNN-LSTM. Both networks train with the shipped recipe's anti-shortcut levers.
# After each step $OUT holds results.tar.part-NN (a tar.gz split in 15 MB parts: the shipped folder with weights,
# every report/metrics/log, timings.json; no fold or CNN weights) plus timings.json, so a timeout loses at most
# the step in flight. The whole run stays inside BUDGET_S seconds (default 540): every step gets a `timeout` of at
# most what is left, and a step that cannot fit is skipped (recorded as such).
#
# Environment: DATA_DIR (default ../shared/data/cxr3), OUT (default runs/paper_experiments/out), WORK_DIR (default
# runs/paper_experiments), BUDGET_S (540), DRY_RUN (0), PYTHON (default .venv/bin/python, else python3),
# WHEELS (.whl: installed to /tmp/site when `datasets` is missing), NUM_FOLDS (5), per-step caps in seconds
# STEP1_S AUDIT_S CV_STEP_S BENCH_S CNN_S LEAKY_S CNN_CV_S, STEP1_EPOCHS (cap the shipped run's epochs; default: config).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START_S=$SECONDS
DRY_RUN=${DRY_RUN:-0}
DATA_DIR=${DATA_DIR:-../shared/data/cxr3}
WORK_DIR=${WORK_DIR:-runs/paper_experiments}
OUT=${OUT:-$WORK_DIR/out}
BUDGET_S=${BUDGET_S:-540}
NUM_FOLDS=${NUM_FOLDS:-5}
WHEELS=${WHEELS:-.whl}
PACK_RESERVE_S=${PACK_RESERVE_S:-25}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HOME=${HF_HOME:-$WORK_DIR/hf_home}

RESULTS=$WORK_DIR/results   # what is packed
RUNS=$WORK_DIR/runs         # trainer checkpoints, CV folds, weights that are not shipped
SHIP=$RESULTS/checkpoints/cnn-lstm-cxr3
CACHE=$WORK_DIR/image_cache
TIMINGS=$RESULTS/timings.json
mkdir -p "$RESULTS/logs" "$RUNS" "$OUT"
rm -rf "$SHIP"

if [[ "$DRY_RUN" == 1 ]]; then
    LSTM_CONFIG=train/configs/tiny.json
    CNN_CONFIG=train/configs/tiny.json
    CNN_FLAGS=(--head_type dense)
    DEVICE_FLAGS=(--use_cpu true --bf16 false --tf32 false --torch_compile false --channels_last false
                  --dataloader_num_workers 0 --bootstrap_samples 20)
    BENCH_FLAGS=(--model_config train/configs/tiny.json --batch_size 8 --steps 2 --warmup_steps 1 --num_images 32
                 --device cpu --tf32 false)
    CORPUS_FLAGS=(--benchmark_images 0 --num_workers 2)
    DEFAULT_EPOCHS=2
else
    LSTM_CONFIG=train/configs/paper.json
    CNN_CONFIG=train/configs/paper_cnn.json
    CNN_FLAGS=()
    DEVICE_FLAGS=()
    BENCH_FLAGS=(--model_config paper --batch_size 256 --bf16 true --channels_last true --torch_compile true
                 --num_workers 8 --steps 50 --warmup_steps 10)
    CORPUS_FLAGS=(--num_workers 8)
    DEFAULT_EPOCHS=125
fi

log() { printf '[%4ds] %s\n' "$((SECONDS - START_S))" "$*"; }
left_s() { echo $((BUDGET_S - (SECONDS - START_S) - PACK_RESERVE_S)); }

# record NAME STATUS SECONDS [KEY=VALUE ...]: one entry of timings.json (values parsed as JSON when they are).
record() {
    "$PYTHON" - "$TIMINGS" "$@" <<'PY'
import json, sys
from pathlib import Path
path, name, status, seconds, *pairs = sys.argv[1:]
timings = json.loads(Path(path).read_text()) if Path(path).is_file() else {"steps": {}}
entry = {"status": status, "seconds": round(float(seconds), 1)}
for pair in pairs:
    key, _, value = pair.partition("=")
    try:
        entry[key] = json.loads(value)
    except ValueError:
        entry[key] = value
timings["steps"][name] = entry
Path(path).write_text(json.dumps(timings, indent=2))
PY
}

# pack: re-create $OUT/results.tar.part-NN from $RESULTS (old parts removed first) and copy timings.json beside.
pack() {
    local tarball=$WORK_DIR/results.tar.gz
    tar -czf "$tarball" -C "$WORK_DIR" results
    rm -f "$OUT"/results.tar.part-*
    split -b 15m -d -a 2 "$tarball" "$OUT/results.tar.part-"
    cp "$TIMINGS" "$OUT/timings.json"
    log "packed $(du -h "$tarball" | cut -f1) into $(find "$OUT" -name 'results.tar.part-*' | wc -l) part(s) in $OUT"
}

# copy_without_weights SRC DST: a final folder's card, config and report, no safetensors.
copy_without_weights() {
    mkdir -p "$2"
    tar -C "$1" --exclude='*.safetensors' --exclude='*.safetensors.index.json' -cf - . | tar -C "$2" -xf -
}

# step NAME CAP_S MIN_S COMMAND...: run COMMAND under `timeout min(CAP_S, what is left)`, log it, time it.
# Skipped when less than MIN_S is left. Returns the command's status; STEP_S holds its wall time.
step() {
    local name=$1 cap=$2 minimum=$3 left limit started status
    shift 3
    left=$(left_s)
    limit=$(( cap < left ? cap : left ))
    STEP_S=0
    if (( limit < minimum )); then
        log "$name: skipped ($left s left, needs $minimum)"
        record "$name" skipped 0 "seconds_left=$left"
        return 1
    fi
    log "$name: start (timeout $limit s)"
    started=$SECONDS
    if timeout --kill-after=15 "$limit" "$@" >"$RESULTS/logs/$name.log" 2>&1; then status=0; else status=$?; fi
    STEP_S=$((SECONDS - started))
    if (( status == 0 )); then
        log "$name: done in $STEP_S s"
    else
        log "$name: FAILED (status $status$( (( status == 124 || status == 137 )) && echo ', timeout')) after $STEP_S s"
        tail -n 15 "$RESULTS/logs/$name.log" | sed 's/^/    /'
        record "$name" "failed" "$STEP_S" "exit_status=$status" "timeout_s=$limit"
    fi
    return "$status"
}

# run_stats METRICS_JSON: "images_per_second=... train_seconds=... epochs=..." from a final folder's report.
run_stats() {
    "$PYTHON" - "$1" <<'PY'
import json, sys
stats = json.load(open(sys.argv[1])).get("run", {}).get("stats", {})
print(f"images_per_second={stats.get('train_samples_per_second', 0):.1f} "
      f"train_seconds={stats.get('wall_seconds', 0):.1f} epochs={stats.get('epoch', 0):.2f}")
PY
}

# ---- setup: wheels the GPU machine lacks (datasets, evaluate, captum, dill, multiprocess) ----
if ! "$PYTHON" -c 'import datasets, evaluate' 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        log "installing $(find "$WHEELS" -name '*.whl' | wc -l) wheel(s) from $WHEELS into /tmp/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEELS"/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "error: datasets/evaluate missing and no wheels in $WHEELS"; exit 2
    fi
fi
"$PYTHON" - >"$RESULTS/environment.json" <<'PY'
import json, platform, torch, transformers
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine()}))
PY
log "environment: $(cat "$RESULTS/environment.json")"
record setup ok "$((SECONDS - START_S))" "dry_run=$DRY_RUN" "budget_s=$BUDGET_S" "data_dir=\"$DATA_DIR\""

# ---- (0) the patient-disjoint corpus, once ----
CORPUS=$WORK_DIR/corpus
if step corpus 120 10 "$PYTHON" scripts/build_corpus.py --source_dir "$DATA_DIR" --output_dir "$CORPUS" \
        --resize_longer_side 256 --num_folds "$NUM_FOLDS" --overwrite true "${CORPUS_FLAGS[@]}"; then
    cp "$CORPUS/report.json" "$RESULTS/corpus_report.json"
    cp "$CORPUS/report.md" "$RESULTS/corpus_report.md" 2>/dev/null || true
    record corpus ok "$STEP_S"
else
    pack; log "no corpus, nothing else can run"; exit 1
fi
pack

# Both networks get the shipped recipe's anti-shortcut levers (train/configs/lungs_cpu.json; README "Training against
# shortcuts"), so the CNN-LSTM and the competitive CNN differ only in the head (issue 20).
RECIPE_FLAGS=(--crop_to_lungs true --outside_lung_swap 0.5 --source_adversary_weight 0.3)
TRAIN_COMMON=(--data_dir "$CORPUS" --image_cache_dir "$CACHE" "${DEVICE_FLAGS[@]}" "${RECIPE_FLAGS[@]}")

# ---- (1) the final CNN-LSTM, shipped, and its shortcut audit ----
if step cnn_lstm_final "${STEP1_S:-240}" 30 "$PYTHON" train/run.py --config "$LSTM_CONFIG" "${TRAIN_COMMON[@]}" \
        --output_dir "$RUNS/cnn_lstm" --final_model_dir "$SHIP" --save_dtype float16 --max_shard_size 15MB \
        ${STEP1_EPOCHS:+--num_train_epochs "$STEP1_EPOCHS"}; then
    # shellcheck disable=SC2046  # word splitting of KEY=VALUE pairs is wanted
    record cnn_lstm_final ok "$STEP_S" $(run_stats "$SHIP/report/metrics.json")
    pack
    if step shortcut_audit "${AUDIT_S:-60}" 10 "$PYTHON" scripts/shortcut_audit.py --model "$SHIP" \
            --data_dir "$CORPUS" --output_dir "$RESULTS/shortcut_audit" --batch_size 64; then
        record shortcut_audit ok "$STEP_S"
        "$PYTHON" scripts/update_card.py --model_dir "$SHIP" \
            --shortcut_audit "$RESULTS/shortcut_audit/shortcut_audit.json" >>"$RESULTS/logs/update_card.log" 2>&1
    fi
fi
pack

# ---- (2) 5-fold patient-grouped CV of the CNN-LSTM; epochs capped to fit what is left (recorded) ----
CV_EPOCHS=$DEFAULT_EPOCHS
CV_CAP=${CV_STEP_S:-220}
if [[ -f "$SHIP/report/metrics.json" && "$DRY_RUN" != 1 ]]; then
    CV_EPOCHS=$("$PYTHON" - "$SHIP/report/metrics.json" "$CV_CAP" "$(left_s)" "$NUM_FOLDS" "$DEFAULT_EPOCHS" <<'PY'
import json, sys
path, cap, left, folds, default = sys.argv[1], *map(float, sys.argv[2:])
stats = json.load(open(path))["run"]["stats"]
per_epoch = stats["wall_seconds"] / max(stats.get("epoch", 1.0), 1.0)  # compile amortized in: conservative
print(int(max(5, min(default, (min(cap, left) * 0.9 / folds) / per_epoch))))
PY
)
fi
CV_NOTE="Each fold trained for up to $CV_EPOCHS epochs (the shipped model: up to $DEFAULT_EPOCHS)."
if step cnn_lstm_cv "$CV_CAP" 60 "$PYTHON" train/run.py --config "$LSTM_CONFIG" "${TRAIN_COMMON[@]}" \
        --output_dir "$RUNS/cnn_lstm_cv" --cross_validation "$NUM_FOLDS" --no_final true \
        --num_train_epochs "$CV_EPOCHS"; then
    record cnn_lstm_cv ok "$STEP_S" "epochs_per_fold=$CV_EPOCHS" "folds=$NUM_FOLDS"
fi
if [[ -f "$RUNS/cnn_lstm_cv/cv_results.json" ]]; then
    cp "$RUNS/cnn_lstm_cv/cv_results.json" "$RESULTS/cnn_lstm_cv_results.json"
    if [[ -f "$SHIP/report/metrics.json" ]]; then
        "$PYTHON" scripts/update_card.py --model_dir "$SHIP" --cv_results "$RESULTS/cnn_lstm_cv_results.json" \
            --cv_note "$CV_NOTE" >>"$RESULTS/logs/update_card.log" 2>&1
    fi
fi
mkdir -p "$RESULTS/cnn_lstm_cv_folds"
for result in "$RUNS"/cnn_lstm_cv/fold-*/fold_result.json; do  # finished folds, also after a timeout
    [[ -f "$result" ]] && cp "$result" "$RESULTS/cnn_lstm_cv_folds/$(basename "$(dirname "$result")").json"
done
pack

# ---- (3) Trainer vs plain loop throughput ----
if step benchmark_train "${BENCH_S:-150}" 40 "$PYTHON" scripts/benchmark_train.py "${BENCH_FLAGS[@]}" \
        --output_json "$RESULTS/benchmark_train.json"; then
    record benchmark_train ok "$STEP_S"
fi
pack

# ---- (4) the dense-head CNN: final (no weights kept in the pack), then its CV if time allows ----
if step cnn_final "${CNN_S:-200}" 40 "$PYTHON" train/run.py --config "$CNN_CONFIG" "${CNN_FLAGS[@]}" \
        "${TRAIN_COMMON[@]}" --output_dir "$RUNS/cnn" --final_model_dir "$RUNS/cnn/final"; then
    # shellcheck disable=SC2046
    record cnn_final ok "$STEP_S" $(run_stats "$RUNS/cnn/final/report/metrics.json")
    # the paper's experiment: both on the same test images, paired intervals, McNemar, both audits' summaries
    if [[ -f "$SHIP/report/metrics.json" ]] && step compare_cnn_lstm 60 10 "$PYTHON" scripts/compare_models.py \
            --cnn_lstm "$SHIP" --cnn "$RUNS/cnn/final" --data_dir "$CORPUS"; then
        record compare_cnn_lstm ok "$STEP_S"
    fi
    copy_without_weights "$RUNS/cnn/final" "$RESULTS/cnn"
fi
pack

# ---- (5) the paper's leaky image-level split, once, with the CNN-LSTM ----
LEAKY=$WORK_DIR/corpus_paper_protocol
if step leaky_corpus 60 5 "$PYTHON" scripts/build_corpus.py --source_dir "$DATA_DIR" --output_dir "$LEAKY" \
        --protocol paper --resize_longer_side 256 --num_folds "$NUM_FOLDS" --overwrite true "${CORPUS_FLAGS[@]}"; then
    record leaky_corpus ok "$STEP_S"
    cp "$LEAKY/report.json" "$RESULTS/corpus_paper_protocol_report.json"
    if step cnn_lstm_leaky "${LEAKY_S:-200}" 40 "$PYTHON" train/run.py --config "$LSTM_CONFIG" \
            --data_dir "$LEAKY" --image_cache_dir "$CACHE" "${DEVICE_FLAGS[@]}" \
            --output_dir "$RUNS/cnn_lstm_leaky" --final_model_dir "$RUNS/cnn_lstm_leaky/final"; then
        copy_without_weights "$RUNS/cnn_lstm_leaky/final" "$RESULTS/cnn_lstm_leaky"
        # shellcheck disable=SC2046
        record cnn_lstm_leaky ok "$STEP_S" $(run_stats "$RUNS/cnn_lstm_leaky/final/report/metrics.json")
        if [[ -f "$SHIP/report/metrics.json" ]]; then
            "$PYTHON" scripts/update_card.py --model_dir "$SHIP" \
                --leaky_metrics "$RESULTS/cnn_lstm_leaky/report/metrics.json" >>"$RESULTS/logs/update_card.log" 2>&1
        fi
    fi
fi
pack

# ---- (4b) the CNN's CV, last: least value per second ----
if step cnn_cv "${CNN_CV_S:-220}" 90 "$PYTHON" train/run.py --config "$CNN_CONFIG" "${CNN_FLAGS[@]}" \
        "${TRAIN_COMMON[@]}" --output_dir "$RUNS/cnn_cv" --cross_validation "$NUM_FOLDS" --no_final true \
        --num_train_epochs "$CV_EPOCHS"; then
    record cnn_cv ok "$STEP_S" "epochs_per_fold=$CV_EPOCHS"
    cp "$RUNS/cnn_cv/cv_results.json" "$RESULTS/cnn_cv_results.json"
fi
record total ok "$((SECONDS - START_S))"
pack
log "all done in $((SECONDS - START_S)) s"
