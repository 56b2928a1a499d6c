"""``ssl-xcit report``: the curves of a real run folder, as PNG and as a self-contained page."""

import base64
import io

import pytest
from PIL import Image

from ssl_xcit.cli import main
from ssl_xcit.pretrain.report import read_curves
from tests.helpers import tiny_pretrain_args


def test_report_draws_a_real_run(tiny_checkpoint, tmp_path):
    run_dir = tiny_checkpoint.parent.parent
    curves = read_curves(run_dir)
    assert {"train/loss", "schedule/lr", "collapse/teacher_entropy", "train/grad_norm"} <= set(curves)
    from ssl_xcit.pretrain.report import draw_report
    figure = draw_report(curves, 64, "run")
    drawn = {line.get_label() for ax in figure.axes for line in ax.get_lines()}
    assert {"loss", "gradient norm (total, before clipping)", "center norm"} <= drawn
    out = tmp_path / "report.png"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 1000

    page = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(page)]) == 0
    text = page.read_text()
    encoded = text.split("data:image/png;base64,")[1].split("'")[0]
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as png:
        assert png.format == "PNG"
    assert "<td>train/loss</td>" in text


def test_later_segments_win_and_errors_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for version, rows in (("version_0", "1,6.9\n2,6.8\n"), ("version_1", "2,6.5\n3,6.4\n")):
        (run_dir / "logs" / version).mkdir(parents=True)
        (run_dir / "logs" / version / "metrics.csv").write_text("step,train/loss\n" + rows)
    assert read_curves(run_dir)["train/loss"] == {1: 6.9, 2: 6.5, 3: 6.4}
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().endswith("nothing does not exist")
    (tmp_path / "elsewhere").mkdir()
    assert main(["report", str(tmp_path / "elsewhere")]) == 2
    assert "elsewhere is not an ssl-xcit run folder: it has neither config.yaml nor logs/" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.jpg")]) == 2


@pytest.mark.slow
def test_a_run_shorter_than_its_logging_interval_says_so_then_draws_once_it_logged(tmp_path, capsys):
    """A real 5-step run that logs every 10 steps has written no curve: one line says why; the same
    run continued to 12 steps has logged step 10, and the report draws that."""
    run_dir = tmp_path / "run"
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="96", data__synthetic_resolution="40",
                              trainer__max_epochs="1", trainer__log_every_n_steps="10")  # 12 steps an epoch
    assert main(["pretrain", *args, "--trainer.max_steps", "5"]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"nothing logged yet in {run_dir}" in err, err
    assert "every 10 optimizer steps (trainer.log_every_n_steps" in err and "last checkpoint is at step 5" in err, err
    assert main(["pretrain", *args, "--trainer.max_steps", "12"]) == 0
    assert main(["report", str(run_dir)]) == 0
    assert sorted(read_curves(run_dir)["train/loss"]) == [9]
    with Image.open(run_dir / "report.png") as png:
        assert png.format == "PNG"
