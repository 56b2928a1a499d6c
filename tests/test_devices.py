"""Which GPU a process binds to, decided from its environment (torch.cuda mocked: runs on CPU)."""

import pytest
import torch

from ssl_xcit.devices import bind_local_gpu
from ssl_xcit.errors import UserError


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch.cuda with ``visible`` GPUs; records set_device calls."""
    state = {"visible": 4, "bound": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["visible"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["visible"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: state["bound"].append(torch.device(device)))
    return state


@pytest.mark.parametrize("environ,visible,bound", [
    ({"LOCAL_RANK": "2"}, 4, "cuda:2"),   # torchrun on a 4-GPU node: rank 2 takes GPU 2
    ({"LOCAL_RANK": "0"}, 4, "cuda:0"),
    ({"LOCAL_RANK": "3"}, 1, "cuda:0"),   # the launcher shows each process its own GPU only
    ({}, 4, None),                        # not launched per GPU: nothing bound
    ({"LOCAL_RANK": "1"}, 0, None),       # no CUDA: nothing bound
])
def test_binds_the_local_rank_gpu_only_when_launched_with_cuda(fake_cuda, environ, visible, bound):
    fake_cuda["visible"] = visible
    device = bind_local_gpu(environ)
    if bound is None:
        assert device is None and fake_cuda["bound"] == []
    else:
        assert device == torch.device(bound) and fake_cuda["bound"] == [torch.device(bound)]


def test_a_local_rank_beyond_the_visible_gpus_is_refused(fake_cuda):
    fake_cuda["visible"] = 2
    with pytest.raises(UserError, match="LOCAL_RANK=2 names a GPU this process cannot see"):
        bind_local_gpu({"LOCAL_RANK": "2"})
    assert fake_cuda["bound"] == []


EVENTS: list[str] = []


def _probe_command(argv) -> int:
    EVENTS.append("command")
    return 0


def test_every_command_binds_before_it_runs(monkeypatch):
    import ssl_xcit.cli as cli
    import ssl_xcit.devices

    EVENTS.clear()
    monkeypatch.setattr(ssl_xcit.devices, "bind_local_gpu", lambda: EVENTS.append("bind"))
    monkeypatch.setitem(cli.COMMANDS, "probe", ("tests.test_devices", "_probe_command", "a test's command"))
    assert cli.main(["probe"]) == 0
    assert EVENTS == ["bind", "command"]
