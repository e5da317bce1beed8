#!/usr/bin/env bash
# Reassemble what scripts/paper_experiments.sh packed ($OUT/results.tar.part-NN) and put it in place:
#   bash scripts/unpack_results.sh PARTS_DIR [DEST]       # DEST defaults to the repository root
# -> DEST/checkpoints/cnn-lstm-cxr3/ (the shipped folder, replaced atomically if present) and DEST/results/ (reports,
#    metrics, logs, timings.json; replaced). KEEP_TAR=PATH also keeps the reassembled tar.gz there.
set -euo pipefail

if (( $# < 1 )); then echo "usage: $0 PARTS_DIR [DEST]" >&2; exit 2; fi
PARTS_DIR=$1
DEST=${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
shopt -s nullglob
parts=("$PARTS_DIR"/results.tar.part-*)
if (( ${#parts[@]} == 0 )); then echo "error: no results.tar.part-* in $PARTS_DIR" >&2; exit 1; fi

staging=$(mktemp -d "${TMPDIR:-/tmp}/unpack-results.XXXXXX")
trap 'rm -rf "$staging"' EXIT
cat "${parts[@]}" >"$staging/results.tar.gz"   # the glob sorts part-00, part-01, ...
tar -xzf "$staging/results.tar.gz" -C "$staging"
if [[ -n "${KEEP_TAR:-}" ]]; then cp "$staging/results.tar.gz" "$KEEP_TAR"; fi

mkdir -p "$DEST/checkpoints"
shipped=$staging/results/checkpoints/cnn-lstm-cxr3
if [[ -d "$shipped" ]]; then
    rm -rf "$DEST/checkpoints/cnn-lstm-cxr3.new"
    mv "$shipped" "$DEST/checkpoints/cnn-lstm-cxr3.new"
    rm -rf "$DEST/checkpoints/cnn-lstm-cxr3"
    mv "$DEST/checkpoints/cnn-lstm-cxr3.new" "$DEST/checkpoints/cnn-lstm-cxr3"
    echo "checkpoint: $DEST/checkpoints/cnn-lstm-cxr3"
else
    echo "warning: the parts hold no shipped checkpoint (step 1 did not finish)" >&2
fi
rmdir "$staging/results/checkpoints" 2>/dev/null || true
rm -rf "$DEST/results"
mv "$staging/results" "$DEST/results"
echo "results: $DEST/results"
