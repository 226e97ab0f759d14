"""Run by tests/test_ddp.py: 2-process DDP (gloo, CPU) on the digits data module, each rank
recording the labels of every batch it trained on. Lightning re-executes this script for rank 1.

    python ddp_script.py OUT MAX_STEPS [CKPT_PATH]
    python ddp_script.py OUT MAX_STEPS --preempt    # checkpoints only at the end or on a signal
"""

import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pdm.data import DigitsDataModule  # noqa: E402
from pdm.nn import UNet  # noqa: E402
from pdm.training import EMA, PDMModule, Preemption, RunCheckpoint  # noqa: E402

OUT, MAX_STEPS = sys.argv[1], int(sys.argv[2])
PREEMPT = "--preempt" in sys.argv[3:]
CKPT = next((a for a in sys.argv[3:] if a != "--preempt"), None)


class Recording(PDMModule):
    def training_step(self, batch, batch_idx):
        with open(os.path.join(OUT, f"rank{self.global_rank}.txt"), "a") as f:
            f.write(f"{self.global_step} " + " ".join(str(int(i)) for i in batch[1][:8]) + "\n")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    L.seed_everything(0)
    torch.set_num_threads(1)
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=OUT,
        limit_val_batches=0,
        callbacks=[
            EMA(decay=0.9),
            RunCheckpoint(save_last=True, every_n_train_steps=10**6 if PREEMPT else 1),
            *([Preemption()] if PREEMPT else []),
        ],
    )
    model = Recording(
        net=UNet(
            in_channels=1,
            image_size=16,
            patch_size=4,
            model_channels=32,
            channel_mult=(1,),
            num_res_blocks=1,
            attention_resolutions=(),
            num_classes=10,
        ),
        warmup_steps=1,
    )
    trainer.fit(
        model,
        datamodule=DigitsDataModule(image_size=16, batch_size=200, val_fraction=0.0),
        ckpt_path=CKPT,
    )
