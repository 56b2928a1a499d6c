import json

import numpy as np
import pytest

import ssl_xcit.eval.feature_store as fs
from ssl_xcit.eval.feature_store import FeatureError, FeatureStoreWriter, check_compatible, load_feature_store

N, D, CHUNK = 10, 6, 4
META = {
    "checkpoint": "run/last.ckpt",
    "arch": "xcit_nano_12_p16",
    "dim": D,
    "normalized": True,
    "class_names": ["a", "b"],
}
FILES = ("features.npy", "labels.npy", "paths.txt", "meta.json")


def _data():
    rng = np.random.default_rng(0)
    paths = [f"img/{i:03d}.jpg" for i in range(N)]
    return rng.normal(size=(N, D)).astype(np.float32), rng.integers(0, 2, size=N), paths


def _write_all(writer, features, labels, paths, start=0):
    for s in range(start, N, CHUNK):
        writer.write(s, features[s : s + CHUNK], labels[s : s + CHUNK], paths[s : s + CHUNK])


def _finished_store(root, meta=META, dim=D):
    features, labels, paths = _data()
    writer = FeatureStoreWriter(root, N, dim, meta)
    _write_all(writer, np.resize(features, (N, dim)), labels, paths)
    writer.finish()
    return root


def test_round_trip(tmp_path):
    features, labels, paths = _data()
    writer = FeatureStoreWriter(tmp_path / "store", N, D, META)
    assert writer.rows_done == 0
    _write_all(writer, features, labels, paths)
    assert writer.rows_done == N
    writer.finish()
    store = load_feature_store(tmp_path / "store")
    assert isinstance(store.features, np.memmap) and store.features.dtype == np.float32
    np.testing.assert_array_equal(store.features, features)
    np.testing.assert_array_equal(store.labels, labels)
    assert store.labels.dtype == np.int64 and store.paths == paths and store.meta == META and store.dim == D
    assert not (tmp_path / "store" / "progress.json").exists()


def test_resume_after_interruption_equals_uninterrupted_write(tmp_path, monkeypatch):
    features, labels, paths = _data()
    _finished_store(tmp_path / "clean")

    # Crash while recording the third chunk: its data and paths are on disk, its progress is not.
    real_write_json = fs.atomic_write_json
    calls = []

    def crash_on_third_chunk(path, payload):
        calls.append(path)
        if len(calls) == 4:  # creation, chunk 1, chunk 2, chunk 3
            raise KeyboardInterrupt
        real_write_json(path, payload)

    monkeypatch.setattr(fs, "atomic_write_json", crash_on_third_chunk)
    writer = FeatureStoreWriter(tmp_path / "resumed", N, D, META)
    with pytest.raises(KeyboardInterrupt):
        _write_all(writer, features, labels, paths)
    del writer
    monkeypatch.setattr(fs, "atomic_write_json", real_write_json)
    assert len((tmp_path / "resumed" / "paths.txt").read_text().splitlines()) == N  # the unrecorded chunk's paths
    # Tear the unrecorded chunk, as a crash in mid-write would.
    torn = np.load(tmp_path / "resumed" / "features.npy", mmap_mode="r+")
    torn[2 * CHUNK :] = 123.0
    torn.flush()
    del torn
    with open(tmp_path / "resumed" / "paths.txt", "a") as f:
        f.write("half/a/pa")

    resumed = FeatureStoreWriter(tmp_path / "resumed", N, D, META)
    assert resumed.rows_done == 2 * CHUNK
    _write_all(resumed, features, labels, paths, start=resumed.rows_done)
    resumed.finish()
    for name in FILES:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_writer_refuses_finished_store_unless_overwrite(tmp_path):
    root = _finished_store(tmp_path / "store")
    with pytest.raises(FeatureError, match="already holds a finished feature store"):
        FeatureStoreWriter(root, N, D, META)
    writer = FeatureStoreWriter(root, N, D, META, overwrite=True)
    assert writer.rows_done == 0 and not (root / "meta.json").exists()


@pytest.mark.parametrize(
    "num_rows, dim, meta, message",
    [
        (N, D + 1, META, f"dim: on disk {D}, requested {D + 1}"),
        (N + 1, D, META, f"num_rows: on disk {N}, requested {N + 1}"),
        (N, D, {**META, "arch": "xcit_small_12_p16"}, "meta: on disk"),
    ],
)
def test_writer_refuses_partial_store_with_other_settings(tmp_path, num_rows, dim, meta, message):
    features, labels, paths = _data()
    FeatureStoreWriter(tmp_path, N, D, META).write(0, features[:CHUNK], labels[:CHUNK], paths[:CHUNK])
    with pytest.raises(FeatureError, match="partial feature store") as err:
        FeatureStoreWriter(tmp_path, num_rows, dim, meta)
    assert message in str(err.value)
    assert FeatureStoreWriter(tmp_path, num_rows, dim, meta, overwrite=True).rows_done == 0


def test_writer_rejects_bad_chunks(tmp_path):
    features, labels, paths = _data()
    writer = FeatureStoreWriter(tmp_path, N, D, META)
    with pytest.raises(FeatureError, match="starts at row 4 but the store has 0 rows done"):
        writer.write(4, features[:CHUNK], labels[:CHUNK], paths[:CHUNK])
    with pytest.raises(FeatureError, match="do not match"):
        writer.write(0, features[:CHUNK], labels[:CHUNK], paths[:2])
    writer.write(0, features[:CHUNK], labels[:CHUNK], paths[:CHUNK])
    bad = features[CHUNK : 2 * CHUNK].copy()
    bad[2, 3] = np.inf
    with pytest.raises(FeatureError, match="non-finite feature in row 6"):
        writer.write(CHUNK, bad, labels[CHUNK : 2 * CHUNK], paths[CHUNK : 2 * CHUNK])
    with pytest.raises(FeatureError, match="cannot finish .* 4 of 10 rows written"):
        writer.finish()
    with pytest.raises(FeatureError, match="not JSON-serialisable"):
        FeatureStoreWriter(tmp_path / "other", N, D, {"transform": object()})


def test_load_missing_folder(tmp_path):
    with pytest.raises(FeatureError, match="does not exist"):
        load_feature_store(tmp_path / "nowhere")


def test_load_incomplete_store(tmp_path):
    features, labels, paths = _data()
    FeatureStoreWriter(tmp_path, N, D, META).write(0, features[:CHUNK], labels[:CHUNK], paths[:CHUNK])
    with pytest.raises(FeatureError, match="incomplete .*rows done: 4"):
        load_feature_store(tmp_path)


def test_load_without_labels(tmp_path):
    root = _finished_store(tmp_path)
    (root / "labels.npy").unlink()
    with pytest.raises(FeatureError, match="has no labels.npy"):
        load_feature_store(root)


def test_load_shape_mismatch(tmp_path):
    root = _finished_store(tmp_path)
    np.save(root / "labels.npy", np.zeros(N - 1, dtype=np.int64))
    with pytest.raises(FeatureError, match=r"labels \(9,\)"):
        load_feature_store(root)


def test_load_non_finite_features(tmp_path):
    root = _finished_store(tmp_path)
    features = np.load(root / "features.npy", mmap_mode="r+")
    features[7, 0] = np.nan
    features.flush()
    del features
    with pytest.raises(FeatureError, match="non-finite value in row 7"):
        load_feature_store(root)
    assert load_feature_store(root, check_finite=False).features.shape == (N, D)


def test_check_compatible(tmp_path):
    a = load_feature_store(_finished_store(tmp_path / "a"))
    check_compatible(a, load_feature_store(_finished_store(tmp_path / "b")))
    wide = load_feature_store(_finished_store(tmp_path / "wide", dim=8))
    with pytest.raises(FeatureError, match=f"differ in dim: .* has {D}, .* has 8"):
        check_compatible(a, wide)
    other = load_feature_store(_finished_store(tmp_path / "other", meta={**META, "arch": "xcit_small_12_p16"}))
    with pytest.raises(FeatureError, match="differ in arch: .*'xcit_nano_12_p16'.*'xcit_small_12_p16'"):
        check_compatible(a, other)


def test_meta_json_holds_the_callers_dict(tmp_path):
    root = _finished_store(tmp_path, meta={**META, "scale": (1, 2)})
    assert json.loads((root / "meta.json").read_text())["scale"] == [1, 2]
