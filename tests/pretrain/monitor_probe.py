"""Run by test_knn_monitor.py as a script: a tiny pretraining run with the k-NN monitor, on
``--trainer.devices`` CPU processes (gloo), that records how many images each rank's
feature passes computed. Lightning relaunches this file per rank.

usage: monitor_probe.py OUT IMAGES [--section.key value ...]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.helpers
from tests.helpers import tiny_pretrain_args  # noqa: E402
from ssl_xcit.eval import sharded_export  # noqa: E402
from ssl_xcit.pretrain.command import parse_pretrain_args  # noqa: E402
from ssl_xcit.pretrain.run import run_pretraining  # noqa: E402

COMPUTED: list[int] = []  # images per feature pass of this process, in call order


def count_images() -> None:
    compute = sharded_export.compute_features

    def counting(model, dataset, **kwargs):
        COMPUTED.append(len(dataset))
        return compute(model, dataset, **kwargs)

    sharded_export.compute_features = counting


def monitor_args(out: Path, images: str, *extra: str) -> list[str]:
    args = tiny_pretrain_args(images, out / "run", data__split="train", data__max_images="16",
                              trainer__max_epochs="1", trainer__accelerator="cpu", monitor__every_n_epochs="1",
                              monitor__train_path=images, monitor__holdout_fraction="0.2", monitor__resize="32",
                              monitor__crop="32", monitor__k="5", monitor__num_workers="1")
    return args + list(extra)


if __name__ == "__main__":
    from pytorch_lightning.utilities import rank_zero_only

    out, images, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    count_images()
    run_pretraining(parse_pretrain_args(monitor_args(out, images, *extra))[0], out / "run")
    with open(out / f"computed_rank{rank_zero_only.rank}.jsonl", "a") as f:  # a line per invocation
        f.write(json.dumps(COMPUTED) + "\n")
