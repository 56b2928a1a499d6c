"""The private APIs ssl-xcit touches (ssl_xcit/compat.py) still exist and mean what we use them for.

A failure here after an upgrade of submitit or Lightning says which private API moved:
mend ssl_xcit/compat.py, never the callers.
"""

import signal

import pytorch_lightning as pl
import pytest
import torch

from ssl_xcit import compat


def test_submitit_requeue_signal_is_usr2_by_default(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert compat.submitit_requeue_signal() == signal.SIGUSR2


def test_slurm_script_renders_without_slurm_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    script = compat.slurm_script(tmp_path / "%j", {"nodes": 2, "ntasks_per_node": 8, "gpus_per_node": 8,
                                                   "time": 90, "signal_delay_s": 120,
                                                   "additional_parameters": {"requeue": True}})
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=90", "#SBATCH --signal=USR2@120", "#SBATCH --requeue"):
        assert line in script, line


class _Record(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((batch_idx, compat.batches_done(trainer)))


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batches_done_counts_the_batch_in_progress(tmp_path):
    record = _Record()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[record], default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.randn(3, 2), batch_size=1))
    assert record.seen == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("skip", [True, False])
def test_fused_adamw_skips_its_step_on_a_device_flag(skip):
    """torch's fused AdamW reads found_inf off the optimizer: a true flag leaves weights, moments
    and step counts as they were; a false one steps as usual."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    compat.skip_optimizer_step_if(optimizer, torch.tensor(skip))
    optimizer.step()
    compat.clear_optimizer_skip(optimizer)
    assert not hasattr(optimizer, "found_inf")
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params))
    unchanged_state = all(torch.equal(s[k], optimizer.state[p][k]) for s, p in zip(state, params) for k in s)
    assert unchanged == unchanged_state == skip


def test_pil_point_lut_is_pillows_own_point():
    """Pillow's core lookup still exists under the name used, and gives Image.point's pixels
    (and each band's table applied to that band, written out)."""
    import numpy as np
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (37, 23, 3), dtype=torch.uint8, generator=generator).numpy()
    img = Image.fromarray(pixels, "RGB")
    lut = torch.randint(0, 256, (768,), generator=generator).tolist()
    out = compat.pil_point_lut(img, lut)  # AttributeError here: Pillow moved its core call
    assert out.mode == "RGB" and out.size == img.size
    assert out.tobytes() == img.point(lut).tobytes()
    want = torch.stack([torch.tensor(lut[256 * b:256 * (b + 1)])[torch.from_numpy(pixels[..., b]).long()]
                        for b in range(3)], dim=-1)
    assert torch.equal(torch.from_numpy(np.asarray(out)).long(), want)
