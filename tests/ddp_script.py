"""Run by tests/test_ddp.py: 2-process DDP (gloo, CPU) for a few steps, each rank recording the
sample indices it trained on. Lightning re-executes this script for rank 1."""

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pdm.data import load_digits_tensor  # noqa: E402
from pdm.nn import UNet  # noqa: E402
from pdm.training import EMA, PDMModule  # noqa: E402


class Indexed(Dataset):
    def __init__(self):
        self.x, _ = load_digits_tensor(16)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i


class Recording(PDMModule):
    def training_step(self, batch, batch_idx):
        with open(os.path.join(OUT, f"rank{self.global_rank}.txt"), "a") as f:
            f.write(" ".join(str(int(i)) for i in batch[1]) + "\n")
        return super().training_step(batch, batch_idx)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Indexed(), batch_size=8, shuffle=True)


OUT = sys.argv[1]

if __name__ == "__main__":
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    torch.set_num_threads(1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=OUT,
                        callbacks=[EMA(decay=0.9), ModelCheckpoint(dirpath=os.path.join(OUT, "ckpt"), save_last=True)])
    model = Recording(net=UNet(in_channels=1, image_size=16, patch_size=4, model_channels=32, channel_mult=(1,),
                               num_res_blocks=1, attention_resolutions=()), warmup_steps=1)
    trainer.fit(model, datamodule=Data())
