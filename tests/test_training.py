"""The training module: loss decrease per target, weighting, expert time range, label dropout,
EMA arithmetic, resume, and every config."""

import glob
import math
import os

import lightning as L
import pytest
import torch
import yaml
from conftest import tiny_module
from torch.optim.swa_utils import AveragedModel

from pdm.data import DigitsDataModule
from pdm.objectives import weighted_x0_loss
from pdm.training import EMA, PDMModule, ema_decay


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(target):
    torch.manual_seed(0)
    m = tiny_module(target=target, lr=2e-3)
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)

    def fixed_loss():
        torch.manual_seed(123)  # the same t and noise every time
        return m.loss_per_sample(x0, None)[0].mean()

    before = fixed_loss().item()
    for _ in range(30):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    assert fixed_loss().item() < 0.7 * before


@pytest.mark.parametrize("weighting", ["sqrt_snr", "snr", "min_snr", "p2"])
def test_module_loss_is_the_objectives_weighting(weighting):
    m = tiny_module(weighting=weighting, target="eps")
    x0 = torch.rand(8, 1, 16, 16)
    torch.manual_seed(5)
    got, n = m.loss_per_sample(x0, None)
    torch.manual_seed(5)
    x_t, n2, eps, alpha, sigma = m.noised_batch(x0)
    ref = weighted_x0_loss(
        m.net(x_t, n2.float()), x0, eps, alpha, sigma, target="eps", weighting=weighting
    )
    assert torch.equal(n, n2)
    assert torch.allclose(got, ref, rtol=1e-6)
    # alpha, sigma are those of the discrete step n of the linear schedule
    abar = m.schedule.alphas_cumprod[n2].float()
    assert torch.allclose(alpha**2, abar, rtol=1e-5)


@pytest.mark.parametrize("time_range", [(396, 999), (0, 395)])
def test_expert_draws_only_its_own_steps(time_range):
    m = tiny_module(time_range=time_range)
    torch.manual_seed(0)
    _, n, _, alpha, sigma = m.noised_batch(torch.zeros(20000, 1, 1, 1))
    assert n.min().item() == time_range[0] and n.max().item() == time_range[1]
    snr = (alpha / sigma) ** 2
    if time_range[0] == 396:
        assert bool((snr < 0.25).all())
    else:
        assert bool((snr >= 0.25).all())


def test_bad_time_range_is_rejected():
    with pytest.raises(ValueError, match="time_range"):
        tiny_module(time_range=(500, 1200))


def test_label_dropout_rate_and_null_label():
    m = tiny_module(num_classes=10, label_dropout=0.1)
    torch.manual_seed(0)
    y = torch.randint(0, 10, (200000,))
    dropped = m.drop_labels(y)
    rate = (dropped == 10).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.003)
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])


def test_ema_update_arithmetic_with_decay_warmup():
    cb = EMA(decay=0.5, warmup=True)
    net = torch.nn.Linear(1, 1, bias=False)
    avg = AveragedModel(net, **cb._kwargs)
    values = [1.0, 3.0, 7.0, 15.0]
    ema = None
    for i, v in enumerate(values):
        with torch.no_grad():
            net.weight.fill_(v)
        avg.update_parameters(net)
        if ema is None:
            ema = v  # first update copies
        else:
            d = min(0.5, i / (9 + i))  # (1 + n) / (10 + n) with n = i - 1 earlier averaged updates
            ema = d * ema + (1 - d) * v
        assert avg.module.weight.item() == pytest.approx(ema, rel=1e-6)
    assert ema_decay(0.9999, 0).item() == pytest.approx(0.1)
    assert ema_decay(0.9999, 10**7).item() == pytest.approx(0.9999)


def _trainer(root, max_steps):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return L.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        callbacks=[
            EMA(decay=0.9),
            ModelCheckpoint(
                dirpath=os.path.join(root, "ckpt"), save_last=True, every_n_train_steps=2
            ),
        ],
    )


def test_resume_continues_step_count_and_restores_ema(tmp_path):
    L.seed_everything(0)
    data = DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0)
    t1 = _trainer(str(tmp_path), 4)
    t1.fit(tiny_module(), datamodule=data)
    last = os.path.join(tmp_path, "ckpt", "last.ckpt")
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    ema_saved = saved["state_dict"]["net.out_conv.weight"]
    raw_saved = saved["current_model_state"]["net.out_conv.weight"]
    assert not torch.equal(ema_saved, raw_saved)  # EMA and raw weights both kept

    t2 = _trainer(str(tmp_path), 6)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            ema_cb = next(c for c in trainer.callbacks if isinstance(c, EMA))
            seen["step"] = trainer.global_step
            seen["ema"] = ema_cb.ema_module.net.out_conv.weight.detach().clone()
            seen["raw"] = pl_module.net.out_conv.weight.detach().clone()

    t2.callbacks.append(Probe())
    t2.fit(
        tiny_module(),
        datamodule=DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0),
        ckpt_path=last,
    )
    assert seen["step"] == 4 and t2.global_step == 6
    assert torch.equal(seen["ema"], ema_saved) and torch.equal(seen["raw"], raw_saved)


CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
# Parameter counts of the official PatchDiffusion-Pytorch UNetModel for these configs, without its
# learned-variance head (counted by building it side by side; see test_unet.py)
OFFICIAL = {
    "lsun_church_p2": 122_475_916,
    "lsun_church_p4": 119_863_344,
    "lsun_church_p8": 119_126_464,
    "imagenet256_high_noise": 200_595_504,
    "imagenet256_low_noise": 200_595_504,
    "ffhq1024_p4": 162_163_632,
}


def test_there_are_configs_for_every_documented_setting():
    names = {os.path.basename(c)[:-5] for c in CONFIGS}
    assert {"digits", "cifar10_p1", "cifar10_p2", "cifar10_p4", "cifar10_p8"} | set(
        OFFICIAL
    ) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_config_builds_its_model(path):
    from pdm.nn import UNet

    cfg = yaml.safe_load(open(path))
    kwargs = {k: v for k, v in cfg["model"].items() if k not in ("init_from", "net")}
    assert cfg["model"]["net"]["class_path"] == "pdm.nn.UNet"
    with torch.device("meta"):
        m = PDMModule(net=UNet(**cfg["model"]["net"]["init_args"]), **kwargs)
    count = sum(p.numel() for p in m.net.parameters())
    name = os.path.basename(path)[:-5]
    if name in OFFICIAL:
        assert count == OFFICIAL[name]
    if name.startswith("cifar10"):
        assert 34e6 < count < 41e6  # matched budgets across P = 1, 2, 4, 8 (34.9-40.3M)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_config_loads_with_print_config(path, capsys):
    from lightning.pytorch.cli import LightningCLI

    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(
            PDMModule,
            subclass_mode_data=True,
            args=["fit", "--config", path, "--print_config"],
            run=True,
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(open(path))["model"]["net"]["init_args"]
    assert printed["model"]["net"]["init_args"]["patch_size"] == given["patch_size"]


@pytest.mark.parametrize("stops", [(6,), (4,), (7,), (3, 6)])
def test_resume_continues_the_same_data_order_anywhere_in_an_epoch(tmp_path, stops):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recording(PDMModule):
        def training_step(self, batch, batch_idx):
            self.seen.append(batch[1].tolist())
            return super().training_step(batch, batch_idx)

    def run(root, steps, ckpt_path=None):
        L.seed_everything(0)
        m = tiny_module(Recording)
        m.seen = []
        t = L.Trainer(
            max_steps=steps,
            default_root_dir=root,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
            callbacks=[
                ModelCheckpoint(
                    dirpath=os.path.join(root, "ckpt"), save_last=True, every_n_train_steps=1
                )
            ],
        )
        t.fit(
            m,
            datamodule=DigitsDataModule(image_size=16, batch_size=400, val_fraction=0.0),
            ckpt_path=ckpt_path,
        )
        return m.seen

    # 1797 images in batches of 400: 4 batches per epoch; stop at the given steps, resume, end at 10
    full = run(str(tmp_path / "full"), 10)
    seen, last = [], None
    for stop in (*stops, 10):
        seen += run(str(tmp_path / "cut"), stop, ckpt_path=last)
        last = str(tmp_path / "cut" / "ckpt" / "last.ckpt")
    assert seen == full
    assert full[0] != full[4]  # epochs are shuffled differently


def test_low_noise_expert_starts_from_the_high_noise_ema_weights(tiny_ckpts):
    saved = torch.load(tiny_ckpts["high"], weights_only=True)["state_dict"]
    low = tiny_module(num_classes=10, time_range=(0, 395), init_from=tiny_ckpts["high"])
    for k, v in low.net.state_dict().items():
        assert torch.equal(v, saved["net." + k])
    with pytest.raises(ValueError, match="different architecture"):
        tiny_module(model_channels=64, init_from=tiny_ckpts["high"])


def _lrs(module, steps, max_steps):
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        enable_checkpointing=False,
    )
    module._trainer = trainer
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt


def test_default_learning_rate_is_warmup_then_constant_and_adam_is_not_fused():
    # every config but the digits default keeps PDM's schedule: linear warm-up, no decay
    lrs, opt = _lrs(tiny_module(lr=1e-3, warmup_steps=4), 10, max_steps=10)
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3] + [1e-3] * 6)
    assert not opt.defaults.get("fused")


def test_cosine_decay_reaches_zero_at_max_steps_and_fused_adam_is_used_when_asked():
    lrs, opt = _lrs(
        tiny_module(lr=1e-3, warmup_steps=2, lr_decay="cosine", fused_optimizer=True),
        11,
        max_steps=10,
    )
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])
    assert lrs[6] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # half way: 0.5
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and opt.defaults["fused"] is True


def test_compile_net_compiles_in_place_and_keeps_checkpoint_keys():
    m = tiny_module(compile_network=True)
    assert m.net._compiled_call_impl is None  # nothing is compiled before fit starts
    keys = list(m.state_dict())
    m.compile_net()
    assert m.net._compiled_call_impl is not None and isinstance(m.net, type(tiny_module().net))
    assert (
        list(m.state_dict()) == keys
    )  # no "_orig_mod." prefixes: checkpoints stay interchangeable
    impl = m.net._compiled_call_impl
    m.compile_net()  # idempotent: a second call (e.g. on resume) does not wrap again
    assert m.net._compiled_call_impl is impl and m.hparams.compile_network is True


def test_fit_with_ema_is_quiet_and_leaves_an_uncompiled_network_by_default(tmp_path, recwarn):
    L.seed_everything(0)
    m = tiny_module()
    _trainer(str(tmp_path), 1).fit(
        m, datamodule=DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0)
    )
    assert m.net._compiled_call_impl is None
    # overriding configure_model makes Lightning's WeightAveraging warn on every run
    assert not [w for w in recwarn if "configure_model" in str(w.message)]


@pytest.mark.slow
def test_fit_with_compiled_network_writes_an_eager_loadable_checkpoint(tmp_path):
    L.seed_everything(0)
    trainer = _trainer(str(tmp_path), 2)
    module = tiny_module(compile_network=True)
    trainer.fit(module, datamodule=DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0))
    assert module.net._compiled_call_impl is not None  # trained compiled
    saved = torch.load(os.path.join(tmp_path, "ckpt", "last.ckpt"), weights_only=True)
    eager = tiny_module()
    eager.load_state_dict(saved["state_dict"], strict=True)
    assert saved["hyper_parameters"]["compile_network"] is True and saved["global_step"] == 2
