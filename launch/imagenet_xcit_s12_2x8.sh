#!/usr/bin/env bash
# DINO x XCiT-S12/16 on ImageNet-1k on 2 SLURM nodes x 8 GPUs (global batch 1024, 300 epochs).
# Pre-emptions and time-outs requeue the job, which resumes from its last checkpoint.
#
#   bash launch/imagenet_xcit_s12_2x8.sh /datasets/imagenet /checkpoints/dino_xcit_s12 gpu [--dry-run] [more options]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 IMAGENET_DIR RUN_DIR PARTITION [ssl-xcit submit options]" >&2
    exit 2
fi
data=$1 run_dir=$2 partition=$3
shift 3
cd "$(dirname "$0")/.."
exec ssl-xcit submit --config configs/imagenet_xcit_small_12_p16.yaml \
    --data.path "$data" --run.dir "$run_dir" \
    --nodes 2 --gpus-per-node 8 --cpus-per-task 10 --mem-gb 480 \
    --partition "$partition" --time 72:00:00 "$@"
