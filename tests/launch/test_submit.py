"""``ssl-xcit submit``: argument handling, --dry-run, validation, and local-executor jobs."""


import pytest
import torch

from tests.helpers import tiny_pretrain_args
from ssl_xcit.cli import main
from ssl_xcit.launch.submit import cluster_overrides, parse_time_minutes, split_argv, sweep_argvs, SubmitOptions


def test_split_keeps_pretraining_arguments_unchanged():
    own, rest = split_argv(["--config", "c.yaml", "--nodes", "2", "--data.path", "x", "--dry-run",
                            "--gpus-per-node=4", "--trainer.max_steps", "5"])
    assert own == ["--nodes", "2", "--dry-run", "--gpus-per-node=4"]
    assert rest == ["--config", "c.yaml", "--data.path", "x", "--trainer.max_steps", "5"]


@pytest.mark.parametrize("nodes,gpus,tasks,want", [
    (2, 8, None, ["gpu", "8", "2", "ddp"]),
    (1, 1, None, ["gpu", "1", "1", "auto"]),
    (1, 0, None, ["cpu", "1", "1", "auto"]),
    (2, 0, 1, ["cpu", "1", "2", "ddp"]),
    (1, 0, 2, ["cpu", "2", "1", "ddp"]),
])
def test_lightning_settings_follow_the_allocation(nodes, gpus, tasks, want):
    args = cluster_overrides(SubmitOptions(nodes=nodes, gpus_per_node=gpus, tasks_per_node=tasks))
    assert args[1::2] == want + ["false"] and args[0::2] == ["--trainer.accelerator", "--trainer.devices",
                                                            "--trainer.num_nodes", "--trainer.strategy",
                                                            "--trainer.enable_progress_bar"]


def test_time_limits():
    assert parse_time_minutes("72:00:00") == 4320
    assert parse_time_minutes("1-02:00:30") == 1561
    with pytest.raises(Exception, match="--time"):
        parse_time_minutes("3h")


def test_sweep_is_a_grid():
    argvs = sweep_argvs(["--a", "1"], ["optim.lr=0.1,0.2", "run.dir=x,y"])
    assert len(argvs) == 4 and argvs[0] == ["--a", "1", "--optim.lr", "0.1", "--run.dir", "x"]


def test_dry_run_prints_the_validated_slurm_script(cifar_slice, tmp_path, capsys):
    run_dir = tmp_path / "not-yet"
    args = tiny_pretrain_args(str(cifar_slice), run_dir, data__batch_size_per_device="4", optim__lr="0.0005")
    assert main(["submit", *args, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "12:00:00", "--account", "vision", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --time=720",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "world size 16", "global batch 64",
                 "peak lr 0.000125 (= 0.0005 x 64 / 256)", "new run"):
        assert line in out, line
    assert not run_dir.exists(), "a dry run writes nothing"


@pytest.mark.parametrize("extra,message", [
    (["--data.path", "/no/such/data"], "data.path: /no/such/data does not exist"),
    (["--time", "soon"], "--time: expected HH:MM:SS"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "a GPU job runs one task per GPU"),
    (["--nodes", "two"], 'Parser key "nodes"'),
])
def test_dry_run_errors_name_the_field(cifar_slice, tmp_path, capsys, extra, message):
    args = tiny_pretrain_args(str(cifar_slice), tmp_path / "run")
    assert main(["submit", *args, "--nodes", "2", "--gpus-per-node", "8", "--dry-run", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_dry_run_touches_no_data(cifar_slice_archive, tmp_path, capsys, monkeypatch):
    """No archive extracted and no folder scanned on the submitting host: the job does that."""
    import ssl_xcit.image_sources as sources

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run read the data")

    monkeypatch.setattr(sources, "build_source", refuse)
    monkeypatch.setattr(sources, "extract_archive", refuse)
    cache = tmp_path / "cache"
    args = tiny_pretrain_args(str(cifar_slice_archive), tmp_path / "run", data__cache_dir=str(cache))
    assert main(["submit", *args, "--nodes", "2", "--gpus-per-node", "8", "--dry-run"]) == 0
    assert str(cifar_slice_archive) in capsys.readouterr().out
    assert not cache.exists()


def test_slurm_executor_allows_as_many_time_outs_as_requeues(tmp_path, monkeypatch):
    """submitit's own limit on time-outs (3 unless told) is set to --max-requeues."""
    from ssl_xcit.launch.submit import build_executor

    for tool in ("sbatch", "srun"):  # a submission host in name only: nothing is submitted here
        (tmp_path / tool).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    executor = build_executor(SubmitOptions(max_requeues=9), tmp_path / "jobs", cpus=1, array=1)
    assert executor.max_num_timeout == 9
    local = build_executor(SubmitOptions(cluster="local", max_requeues=7), tmp_path / "jobs", cpus=1, array=1)
    assert local._executor.max_num_timeout == 7


def test_dry_run_reports_the_checkpoint_it_would_resume(tiny_checkpoint, capsys):
    run_dir = tiny_checkpoint.parent.parent
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="16")
    assert main(["submit", *args, "--cluster", "local", "--gpus-per-node", "0", "--dry-run"]) == 0
    assert f"resumes from {tiny_checkpoint}" in capsys.readouterr().out


@pytest.mark.slow
def test_local_executor_job_completes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="32", data__synthetic_resolution="40",
                              trainer__max_epochs="1")
    assert main(["submit", *args, "--cluster", "local", "--gpus-per-node", "0", "--time", "00:10:00",
                 "--cpus-per-task", "1", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted job" in out and "last.ckpt" in out
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "finished" in (run_dir / "job.log").read_text()


def test_requeues_are_bounded():
    from ssl_xcit.launch.job import PretrainJob

    argv = ["--data.path", "synthetic"]
    again = PretrainJob(max_requeues=2, requeues=1, timeouts=1).checkpoint(argv)
    assert again is not None and again.function.requeues == 2 and again.args == (argv,)
    assert again.function.timeouts == 1
    assert PretrainJob(max_requeues=2, requeues=2).checkpoint(argv) is None


@pytest.mark.slow
def test_sweep_runs_a_job_array(tmp_path):
    from ssl_xcit.launch.submit import submit_jobs

    args = tiny_pretrain_args("synthetic", tmp_path / "unused", data__synthetic_size="16",
                              data__synthetic_resolution="40", trainer__max_steps="2")
    jobs = submit_jobs([*args, "--cluster", "local", "--gpus-per-node", "0", "--cpus-per-task", "1",
                        "--sweep", f"run.dir={tmp_path / 'a'},{tmp_path / 'b'}", "--sweep", "optim.lr=0.001", "--wait"])
    assert len(jobs) == 2
    for name in ("a", "b"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["config"]["optim"]["lr"] == 0.001


def test_submit_without_slurm_is_one_line_naming_what_is_missing(cifar_slice, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    args = tiny_pretrain_args(str(cifar_slice), tmp_path / "run", data__batch_size_per_device="4")
    assert main(["submit", *args, "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sbatch and srun not found" in err, err
    assert not (tmp_path / "run").exists()


def test_launch_profile_and_recipe_dry_run(cifar_slice, tmp_path, capsys, monkeypatch):
    from tests.helpers import REPO

    monkeypatch.setenv("PATH", str(tmp_path))  # renders without SLURM
    args = tiny_pretrain_args(str(cifar_slice), tmp_path / "run", data__batch_size_per_device="4")
    assert main(["submit", "--launch", str(REPO / "launch" / "cpu_test.yaml"), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # the profile's 2 CPU tasks; each asks for its process + the recipe's 0 loader workers
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --time=30", "world size 2"):
        assert line in out, line


def test_cpu_tasks_ask_for_their_workers_and_gpu_tasks_for_ten(cifar_slice, tmp_path):
    from ssl_xcit.launch.submit import cpus_per_task
    from ssl_xcit.pretrain.command import parse_pretrain_args

    cfg = parse_pretrain_args(tiny_pretrain_args(str(cifar_slice), tmp_path, data__num_workers="3"))[0]
    assert cpus_per_task(SubmitOptions(gpus_per_node=0), cfg) == 4
    assert cpus_per_task(SubmitOptions(gpus_per_node=8), cfg) == 10
    assert cpus_per_task(SubmitOptions(gpus_per_node=0, cpus_per_task=2), cfg) == 2
