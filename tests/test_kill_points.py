

def _signal_workers_mid_epoch(loader) -> list:
    """Two batches, SIGTERM and SIGUSR2 to every worker (as SLURM signals the whole job), the rest."""
    import time

    batches = iter(loader)
    got = [next(batches), next(batches)]
    workers = loader._iterator._workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR2)
    time.sleep(1)
    return got + list(batches)


def test_loader_workers_ignore_stop_signals(tmp_path):
    from torch.utils.data import DataLoader

    from ssl_xcit.data import PretrainDataModule

    cfg = parse_pretrain_args(tiny_pretrain_args("synthetic", tmp_path, data__synthetic_size="64",
                                                 data__synthetic_resolution="40", data__num_workers="2"))[0]
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGUSR2)}  # a fresh process's
    try:
        datamodule = PretrainDataModule(cfg.data, cfg.augment, 0)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        assert len(_signal_workers_mid_epoch(loader)) == 8
        assert all(w.is_alive() for w in loader._iterator._workers)
        # without the workers' handlers the same signals end the epoch in a crash
        plain = DataLoader(datamodule.dataset, batch_size=8, sampler=datamodule.sampler, num_workers=2,
                           persistent_workers=True)
        with pytest.raises(RuntimeError, match="killed by signal"):
            _signal_workers_mid_epoch(plain)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
