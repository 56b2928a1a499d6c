#!/usr/bin/env bash
# Evaluate a pretraining checkpoint the way the DINO and XCiT papers do:
# export teacher features of a labelled dataset, then weighted k-NN and a linear probe.
#
#   bash eval/evaluate_checkpoint.sh CHECKPOINT DATA OUT_DIR [extra export options]
#   bash eval/evaluate_checkpoint.sh runs/quickstart/checkpoints/last.ckpt \
#        ../shared/data/cifar10-jpeg.tar.gz eval-quickstart --resize 32 --crop 32
#
# DATA holds train/ and val/ (or test/) class folders, or is a .tar.gz of such a tree.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CHECKPOINT DATA OUT_DIR [export options, e.g. --resize 32 --crop 32]" >&2
    exit 2
fi
ckpt=$1 data=$2 out=$3
shift 3
ssl-xcit export --checkpoint "$ckpt" --data "$data" --split train --out "$out/features/train" "$@"
ssl-xcit export --checkpoint "$ckpt" --data "$data" --split val,test --out "$out/features/eval" "$@"
ssl-xcit knn --train "$out/features/train" --test "$out/features/eval" --out "$out/knn.json"
ssl-xcit linear --train "$out/features/train" --test "$out/features/eval" --out "$out/linear.json"
