import csv

from tests.helpers import tiny_pretrain_args
from ssl_xcit.pretrain.command import parse_pretrain_args
from ssl_xcit.pretrain.run import run_pretraining


def test_monitor_logs_teacher_knn_each_epoch(cifar_slice, tmp_path, capsys):
    args = tiny_pretrain_args(str(cifar_slice), tmp_path / "run", data__max_images="64", trainer__max_epochs="2",
                              monitor__every_n_epochs="1", monitor__train_path=str(cifar_slice),
                              monitor__resize="32", monitor__crop="32", monitor__k="5")
    run_pretraining(parse_pretrain_args(args)[0], tmp_path / "run")
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as f:
        values = [float(r["knn/top1_k5"]) for r in csv.DictReader(f) if r.get("knn/top1_k5")]
    assert len(values) == 2 and all(0 <= v <= 100 for v in values)
    assert "teacher k-NN top-1 (k=5)" in capsys.readouterr().out
