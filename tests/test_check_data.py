"""``ssl-xcit check-data``: every unreadable image named, counted, and a non-zero exit."""

import shutil

from ssl_xcit.cli import main


def test_names_every_unreadable_image_and_fails(cifar_slice, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(cifar_slice, root)
    truncated = sorted((root / "train" / "cat").iterdir())[3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    not_an_image = root / "test" / "dog" / "notes.jpg"
    not_an_image.write_text("not a picture")
    (root / "README.txt").write_text("ignored: not an image extension")
    assert main(["check-data", str(root), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    bad = [line.split(": ")[0].removeprefix("unreadable image ") for line in out.splitlines()]
    assert sorted(bad) == sorted([str(truncated), str(not_an_image)])
    assert "401 images checked" in err and ": 2 unreadable" in err

    assert main(["check-data", str(root), "--split", "test", "--workers", "1"]) == 1
    assert capsys.readouterr().out.splitlines() == [line for line in out.splitlines() if "notes.jpg" in line]


def test_a_clean_archive_passes(cifar_slice_archive, tmp_path, capsys):
    assert main(["check-data", str(cifar_slice_archive), "--cache-dir", str(tmp_path)]) == 0
    assert "400 images checked" in capsys.readouterr().out


def test_a_missing_path_is_one_line(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    assert f"--path: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
