"""The submitit job's own bookkeeping: which rank writes, and files two ranks may write at once."""

import multiprocessing

import pytest
from pytorch_lightning.utilities import rank_zero_only

from ssl_xcit.files import atomic_write_text
from ssl_xcit.launch.job import export_distributed_env


@pytest.mark.parametrize("rank", [0, 1])
def test_each_local_task_knows_its_rank_before_lightning_starts(monkeypatch, rank):
    """submitit's local executor sets only its own variables, which Lightning (its rank read at
    import) does not know: every task used to write as rank 0, through the same files."""
    for key in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.setenv(key, "")  # restored (to unset) after the test, whatever the job exports
        monkeypatch.delenv(key)
    env = dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="123", SUBMITIT_LOCAL_NTASKS="2",
               SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID=str(rank),
               SUBMITIT_LOCAL_LOCALID=str(rank))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert export_distributed_env().global_rank == rank
    assert rank_zero_only.rank == rank


def _write_many(path: str, text: str) -> None:
    for _ in range(200):
        atomic_write_text(path, text)


def test_two_processes_writing_one_file_never_collide(tmp_path):
    """Each writer fills a temporary file of its own: no rename finds its file gone, and the
    target always holds one whole version."""
    target = tmp_path / "config.yaml"
    writers = [multiprocessing.get_context("fork").Process(target=_write_many, args=(str(target), text * 1000))
               for text in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
