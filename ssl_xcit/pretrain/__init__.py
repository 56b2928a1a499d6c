"""Pretraining: DINO self-distillation of an XCiT (the LightningModule, its loss, head,
augmentation, data, schedules and checkpoints)."""
