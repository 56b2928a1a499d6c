"""Checkpoint files: never half-written, and a failed write stops the run naming the file."""

import pytest
import torch

import ssl_xcit.files
from ssl_xcit.cli import main
from ssl_xcit.files import atomic_torch_save
from tests.helpers import tiny_pretrain_args


def test_interrupted_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "weights": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_checkpoint_write_stops_naming_the_file_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    saves = {"n": 0}

    def disk_full_on_second_save(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ssl_xcit.files.torch, "save", disk_full_on_second_save)
    run_dir = tmp_path / "run"
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="64", data__synthetic_resolution="40",
                              run__checkpoint_every_n_steps="3", run__saveckp_freq="0")
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert len(err.splitlines()) == 1 and f"could not write checkpoint {last}: No space left on device" in err, err
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the first save, whole
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
