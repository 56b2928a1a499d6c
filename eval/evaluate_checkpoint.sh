#!/usr/bin/env bash
# An example chain over one checkpoint: export teacher features of a labelled dataset, then
# weighted k-NN and the fast linear probe, each read from a protocol in eval/.
#
#   bash eval/evaluate_checkpoint.sh CHECKPOINT DATA OUT_DIR [PROTOCOL] [extra options]
#   bash eval/evaluate_checkpoint.sh runs/quickstart/checkpoints/last.ckpt \
#        ../shared/data/cifar10-jpeg.tar.gz eval-quickstart eval/cifar64_knn.yaml
#
# DATA holds train/ and val/ (or test/) class folders, or is a .tar.gz of such a tree.
# PROTOCOL (default eval/dino_knn.yaml) sets the evaluation transform and the k-NN settings.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CHECKPOINT DATA OUT_DIR [PROTOCOL.yaml] [export options]" >&2
    exit 2
fi
ckpt=$1 data=$2 out=$3
here=$(dirname "$0")
shift 3
protocol=$here/dino_knn.yaml
if [ $# -ge 1 ] && [[ $1 == *.yaml ]]; then protocol=$1; shift; fi
ssl-xcit export --config "$protocol" --checkpoint "$ckpt" --data "$data" --split train --out "$out/features/train" "$@"
ssl-xcit export --config "$protocol" --checkpoint "$ckpt" --data "$data" --split val,test --out "$out/features/eval" "$@"
ssl-xcit knn --config "$protocol" --train "$out/features/train" --test "$out/features/eval" --out "$out/knn.json"
ssl-xcit linear --config "$here/linear_grid.yaml" --train "$out/features/train" --test "$out/features/eval" --out "$out/linear.json"
