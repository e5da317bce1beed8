#!/usr/bin/env bash
# Train the shipped CNN-LSTM on a CPU in the background, or resume it: the same command does both.
#
#   scripts/train_cpu.sh                                   # runs/cnn-lstm-cxr3-cpu, train/configs/lungs_cpu.json
#   OUTPUT_DIR=runs/x CONFIG=train/configs/tiny.json DATA_DIR=CORPUS scripts/train_cpu.sh --num_train_epochs 3
#
# Starts `python train/run.py --config $CONFIG --resume_from_checkpoint last ...` with nohup and returns at once.
# - $OUTPUT_DIR/training_log.txt: one line per epoch (epoch, train loss, validation macro-F1, images/s, ETA);
# - $OUTPUT_DIR/run.log: everything the run prints; $OUTPUT_DIR/train.pid: its process id while it runs.
# A checkpoint is saved every epoch; if the process is stopped (machine shut down, kill, session end), give the same
# command again: it continues from the last checkpoint (a low-resolution stage that had finished is not redone) and
# reaches the same weights as an uninterrupted run with the same seed. Extra arguments go to train/run.py.
# WAIT=1 runs in the foreground instead (the exit status is the run's).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${OUTPUT_DIR:-runs/cnn-lstm-cxr3-cpu}
CONFIG=${CONFIG:-train/configs/lungs_cpu.json}
DATA_DIR=${DATA_DIR:-../shared/data/cxr3}
PYTHON=${PYTHON:-python}
mkdir -p "$OUTPUT_DIR"
pid_file=$OUTPUT_DIR/train.pid
running() {  # a live (not zombie) train/run.py with this pid: a stale pid file or a reused pid does not count
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/$pid/stat" ]; then
        [ "$(cut -d' ' -f3 "/proc/$pid/stat")" != Z ] || return 1
        tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "train/run.py" || return 1
    fi
}
if [ -f "$pid_file" ] && running "$(cat "$pid_file")"; then
    echo "already running in $OUTPUT_DIR (pid $(cat "$pid_file")); progress: $OUTPUT_DIR/training_log.txt"
    exit 0
fi
command=("$PYTHON" train/run.py --config "$CONFIG" --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR"
         --resume_from_checkpoint last "$@")
echo "$(date '+%Y-%m-%d %H:%M:%S') ${command[*]}" >> "$OUTPUT_DIR/run.log"
if [ "${WAIT:-0}" = 1 ]; then
    "${command[@]}" >> "$OUTPUT_DIR/run.log" 2>&1
    exit $?
fi
nohup "${command[@]}" >> "$OUTPUT_DIR/run.log" 2>&1 < /dev/null &
echo $! > "$pid_file"
echo "training in the background (pid $!); one line per epoch: tail -f $OUTPUT_DIR/training_log.txt"
echo "stopped? run the same command again to resume from the last checkpoint"
