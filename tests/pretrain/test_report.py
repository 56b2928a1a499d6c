"""``ssl-xcit report``: the curves of a real run folder, as PNG and as a self-contained page."""

import base64
import io

from PIL import Image

from ssl_xcit.cli import main
from ssl_xcit.pretrain.report import read_curves


def test_report_draws_a_real_run(tiny_checkpoint, tmp_path):
    run_dir = tiny_checkpoint.parent.parent
    curves = read_curves(run_dir)
    assert {"train/loss", "schedule/lr", "collapse/teacher_entropy"} <= set(curves)
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
    for version, rows in (("version_0", "1,6.9\n2,6.8\n"), ("version_1", "2,6.5\n3,6.4\n")):
        (tmp_path / "logs" / version).mkdir(parents=True)
        (tmp_path / "logs" / version / "metrics.csv").write_text("step,train/loss\n" + rows)
    assert read_curves(tmp_path)["train/loss"] == {1: 6.9, 2: 6.5, 3: 6.4}
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no logs/version_*/metrics.csv" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.jpg")]) == 2
