import json

import numpy as np
import pytest

from tests.helpers import REPO
import torch

from ssl_xcit.weights import load_backbone
from ssl_xcit.cli import main
from ssl_xcit.eval.feature_store import FeatureStoreWriter, load_feature_store
from ssl_xcit.eval.export import eval_transform, export_features
from ssl_xcit.image_sources import build_source


def test_export_then_knn_and_linear_on_real_images(cifar_slice, tiny_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(cifar_slice), "--resize", "32", "--crop", "32",
              "--batch-size", "64", "--num-workers", "0", "--progress", "false"]
    assert main(["export", *common, "--split", "train", "--out", str(tmp_path / "train")]) == 0
    assert main(["export", *common, "--split", "test", "--out", str(tmp_path / "test")]) == 0
    train = load_feature_store(tmp_path / "train")
    assert train.features.shape == (300, 128) and train.features.dtype == np.float32
    assert train.meta["arch"] == "xcit_nano_12_p8_224" and len(train.meta["class_names"]) == 10
    assert len(train.paths) == 300 and train.paths[0].endswith(".jpg")

    # the stored feature of an image is the teacher's CLS embedding of its evaluation crop
    loaded = load_backbone(tiny_checkpoint)
    image, label = build_source(train.paths[5].rsplit("/", 2)[0], None, "/unused")[0]
    with torch.no_grad():
        direct = loaded.model(eval_transform(32, 32, loaded.mean, loaded.std)(image).unsqueeze(0))[0].numpy()
    assert np.allclose(train.features[0], direct, atol=1e-5) and train.labels[0] == label

    # --precision bf16 reaches the backbone and is recorded; float32 is the default
    assert main(["export", *common, "--split", "test", "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    fp32, bf16 = load_feature_store(tmp_path / "test"), load_feature_store(tmp_path / "bf16")
    assert (fp32.meta["precision"], bf16.meta["precision"]) == ("fp32", "bf16")
    assert not np.array_equal(bf16.features, fp32.features)
    assert np.abs(bf16.features - fp32.features).max() < 0.02 * np.abs(fp32.features).max()

    report = tmp_path / "knn.json"
    assert main(["knn", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                 "--k", "10", "20", "--out", str(report)]) == 0
    results = json.loads(report.read_text())["results"]
    assert [r["k"] for r in results] == [10, 20] and all(0 <= r["top1"] <= 100 for r in results)
    assert main(["linear", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                 "--epochs", "5", "--out", str(tmp_path / "linear.json")]) == 0
    assert "test top1" in capsys.readouterr().out


def test_knn_exports_on_the_fly_and_reuses_the_stores(cifar_slice, tiny_checkpoint, tmp_path, capsys):
    args = ["knn", "--checkpoint", str(tiny_checkpoint), "--train-data", str(cifar_slice), "--resize", "32",
            "--crop", "32", "--num-workers", "0", "--progress", "false", "--features-dir", str(tmp_path), "--k", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    stores = sorted(p.name for p in tmp_path.iterdir())
    assert len(stores) == 2
    assert main(args) == 0
    assert capsys.readouterr().out == first and sorted(p.name for p in tmp_path.iterdir()) == stores


class Interrupt(Exception):
    pass


def test_resumed_export_equals_uninterrupted(cifar_slice, tiny_checkpoint, tmp_path, monkeypatch):
    loaded = load_backbone(tiny_checkpoint)
    source = build_source(str(cifar_slice), "test", "/unused")
    kwargs = dict(resize=32, crop=32, batch_size=16, num_workers=0, progress=False)
    export_features(loaded, source, tmp_path / "whole", **kwargs)

    real_write, calls = FeatureStoreWriter.write, {"n": 0}

    def write_then_die(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt
        real_write(self, *args, **kw)

    monkeypatch.setattr(FeatureStoreWriter, "write", write_then_die)
    with pytest.raises(Interrupt):
        export_features(loaded, source, tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(FeatureStoreWriter, "write", real_write)
    export_features(loaded, source, tmp_path / "resumed", **kwargs)
    for name in ("features.npy", "labels.npy", "paths.txt", "meta.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_cls_plus_avgpool_doubles_the_dimension(cifar_slice, tiny_checkpoint, tmp_path):
    source = build_source(str(cifar_slice), "test", "/unused", max_images=8)
    export_features(load_backbone(tiny_checkpoint), source, tmp_path, resize=32, crop=32, variant="cls+avgpool",
                    num_workers=0, progress=False)
    assert load_feature_store(tmp_path).features.shape == (8, 256)


def test_knn_errors_are_one_line(tmp_path, capsys):
    assert main(["knn", "--train", str(tmp_path / "a")]) == 2
    assert "--train and --test go together" in capsys.readouterr().err
    assert main(["knn", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "b")]) == 2
    assert str(tmp_path / "a") in capsys.readouterr().err


def test_dino_linear_protocol_report(cifar_slice, tiny_checkpoint, tmp_path):
    report_path = tmp_path / "dino_linear.json"
    assert main(["linear", "--protocol", "dino", "--checkpoint", str(tiny_checkpoint), "--train-data",
                 str(cifar_slice), "--resize", "32", "--crop", "32", "--epochs", "2", "--batch-size", "64",
                 "--num-workers", "0", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["protocol"] == "dino" and report["num_test"] == 100 and report["dim"] == 128
    assert 0 <= report["test_top1"] <= report["test_top5"] <= 100
    assert report["lr"] == pytest.approx(0.001 * 64 / 256)


def test_dino_linear_protocol_leaves_the_backbone_untouched(cifar_slice, tiny_checkpoint):
    from ssl_xcit.eval.linear_dino import dino_linear_eval

    loaded = load_backbone(tiny_checkpoint)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    source = build_source(str(cifar_slice), "test", "/unused")
    dino_linear_eval(loaded, source, source, 10, epochs=1, batch_size=50, resize=32, crop=32, num_workers=0,
                     accelerator="cpu")
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BatchNorm statistics moved"


@pytest.mark.slow
def test_export_across_two_processes_equals_one(cifar_slice, tiny_checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 -m ssl_xcit.cli export ...`: shards merged in dataset order."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--data", str(cifar_slice), "--split", "test",
            "--resize", "32", "--crop", "32", "--batch-size", "16", "--num-workers", "0", "--progress", "false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    procs = [subprocess.Popen([sys.executable, "-m", "ssl_xcit.cli", *args, "--out", str(tmp_path / "two")],
                              env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                                       RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = load_feature_store(tmp_path / "two"), load_feature_store(tmp_path / "one")
    assert two.paths == one.paths and np.array_equal(two.labels, one.labels)
    assert np.allclose(two.features, one.features, atol=1e-5)
    assert two.meta["world_size"] == 2 and not (tmp_path / "two" / ".shards").exists()


@pytest.mark.slow
def test_evaluate_checkpoint_script_runs_the_whole_chain(cifar_slice_archive, tiny_checkpoint, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = REPO / "eval" / "evaluate_checkpoint.sh"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(script), str(tiny_checkpoint), str(cifar_slice_archive), str(tmp_path),
                           "--resize", "32", "--crop", "32", "--num-workers", "0", "--progress", "false"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_feature_store(tmp_path / "features" / "eval").features.shape == (100, 128)
    assert [r["k"] for r in json.loads((tmp_path / "knn.json").read_text())["results"]] == [10, 20, 100, 200]
    assert "test_top1" in json.loads((tmp_path / "linear.json").read_text())


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_unreadable_image_fails_the_export_naming_it(cifar_slice, tiny_checkpoint, tmp_path, capsys, workers):
    """Features must not silently shift: no skipping in an export, one line naming the file
    (also when the image is decoded in a loader worker)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(cifar_slice / "test", root)
    bad = sorted((root / "horse").iterdir())[2]
    bad.write_bytes(bad.read_bytes()[:100])
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--data", str(root), "--resize", "32", "--crop", "32",
                 "--num-workers", workers, "--progress", "false", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unreadable image {bad}: " in err, err


def _linear_output_dtypes(model: torch.nn.Module) -> set:
    """Hooks recording the dtype each nn.Linear of ``model`` computes in."""
    seen: set = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda mod, inputs, output: seen.add(output.dtype))
    return seen


def test_features_are_float32_and_bf16_runs_the_backbone_in_bf16():
    from torch.utils.data import TensorDataset

    from ssl_xcit.eval.export import compute_features
    from ssl_xcit.weights import random_backbone

    model = random_backbone("xcit_nano_12_p8_224", 0, depth=2).model.eval()
    images = TensorDataset(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(6))
    kwargs = dict(batch_size=4, num_workers=0, device=torch.device("cpu"))
    dtypes = _linear_output_dtypes(model)
    fp32, _ = compute_features(model, images, **kwargs)
    assert dtypes == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. the monitor inside a bf16 training step
        inside, _ = compute_features(model, images, **kwargs)
    assert np.array_equal(inside, fp32), "fp32 features must not inherit an outer autocast"
    dtypes.clear()
    bf16, labels = compute_features(model, images, precision="bf16", **kwargs)
    assert dtypes == {torch.bfloat16}
    assert fp32.dtype == bf16.dtype == np.float32 and labels.tolist() == list(range(6))
    assert not np.array_equal(bf16, fp32)
    assert np.abs(bf16 - fp32).max() < 0.02 * np.abs(fp32).max()  # bf16 keeps ~3 significant digits
    cosine = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() > 0.9999
