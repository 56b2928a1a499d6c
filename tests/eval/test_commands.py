"""The evaluation commands' shared conventions: protocols from eval/*.yaml, the random floor."""

import numpy as np
import pytest

from ssl_xcit.cli import main
from ssl_xcit.eval.feature_store import load_feature_store
from tests.helpers import REPO


def _export(out, cifar_slice, *extra):
    return main(["export", "--config", str(REPO / "eval" / "cifar32_knn.yaml"), "--data", str(cifar_slice),
                 "--split", "test", "--num-workers", "0", "--progress", "false", "--out", str(out), *extra])


def test_random_checkpoint_gives_the_same_features_for_the_same_seed(cifar_slice, tmp_path):
    random = ["--checkpoint", "random", "--arch", "xcit_nano_12_p16_224"]
    assert _export(tmp_path / "a", cifar_slice, *random) == 0
    assert _export(tmp_path / "b", cifar_slice, *random) == 0
    assert _export(tmp_path / "c", cifar_slice, *random, "--init-seed", "1") == 0
    a, b, c = (load_feature_store(tmp_path / n).features for n in "abc")
    assert a.shape == (100, 128)  # the protocol's 32-px crop reached the model: (10 classes x 10) x embed_dim
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_random_needs_an_architecture(cifar_slice, tmp_path, capsys):
    assert _export(tmp_path / "a", cifar_slice, "--checkpoint", "random") == 2
    assert "--checkpoint random needs --arch" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", sorted(p.name for p in (REPO / "eval").glob("*.yaml")))
def test_every_protocol_parses_for_its_command(protocol):
    from ssl_xcit.eval.options import EvaluateOptions, ExportOptions, SegmentOptions
    from ssl_xcit.options import parse_options

    config = ["--config", str(REPO / "eval" / protocol)]
    if protocol.endswith("_segment.yaml"):  # a dense protocol: `ssl-xcit segment`
        parsed = parse_options(SegmentOptions, config, "test", "test").options
        assert parsed.lrs and parsed.ignore_label >= 0
        return
    for options in (EvaluateOptions, ExportOptions):  # a classification protocol: export, knn, linear
        parsed = parse_options(options, config, "test", "test").options
        assert parsed.resize >= parsed.crop


def test_a_wrong_key_in_a_protocol_names_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kk: [20]\n")
    assert main(["knn", "--config", str(bad), "--train", "a", "--test", "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kk" in err and str(bad) in err, err
