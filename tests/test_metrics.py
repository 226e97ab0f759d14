"""Metrics: Fréchet distances, stored statistics, the offline digits feature space, Inception
weights offline, paired quality, step cost."""

import numpy as np
import pytest
import torch

from pdm.metrics import (
    DigitsFeatures,
    FeatureStats,
    compute_stats,
    count_flops,
    digits_fd_baseline,
    digits_fd_metric,
    digits_reference_images,
    fid_against,
    inception_weights_path,
    measure_step_cost,
    paired_quality,
    peak_bf16_flops,
)


@pytest.fixture(scope="module")
def digits():
    return digits_reference_images().numpy()


def _noisy(images, scale, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float64) + rng.normal(0, scale, images.shape), 0, 255).astype(
        np.uint8
    )


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_noise(digits):
    metric = digits_fd_metric()
    stats = compute_stats(metric, digits)
    values = [
        fid_against(metric, stats, _noisy(digits, s)) if s else fid_against(metric, stats, digits)
        for s in (0, 10, 30, 80)
    ]
    assert abs(values[0]) < 1e-6
    assert values[0] < values[1] < values[2] < values[3]


def test_fd_matches_the_closed_form_for_gaussians():
    # features are the identity on 4 "pixels": FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)
    from scipy import linalg

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).double()

    from pdm.metrics import make_fid

    metric = make_fid(feature=Identity(), input_img_size=(1, 2, 2))
    rng = np.random.default_rng(0)
    a = rng.integers(60, 200, (4000, 2, 2, 1)).astype(np.uint8)
    b = np.clip(a.astype(int) * 0.7 + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)
    fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    m1, m2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid_against(metric, compute_stats(metric, a), b) == pytest.approx(ref, rel=1e-4)


def test_reference_statistics_round_trip_through_npz(digits, tmp_path):
    metric = digits_fd_metric()
    stats = compute_stats(metric, digits)
    stats.save(tmp_path / "ref.npz")
    back = FeatureStats.load(tmp_path / "ref.npz")
    assert (
        back.n == 1797
        and np.array_equal(back.mu, stats.mu)
        and np.array_equal(back.sigma, stats.sigma)
    )
    noisy = _noisy(digits, 20)
    assert fid_against(digits_fd_metric(), back, noisy) == pytest.approx(
        fid_against(metric, stats, noisy), rel=1e-9
    )


def test_digits_feature_space_separates_real_digits_from_noise(digits):
    stats, baseline = digits_fd_baseline(500)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (500, 32, 32, 1)).astype(np.uint8)
    blank = np.zeros((500, 32, 32, 1), dtype=np.uint8)
    metric = digits_fd_metric()
    assert baseline < 0.5
    assert fid_against(metric, stats, noise) > 20 * baseline
    assert fid_against(metric, stats, blank) > 20 * baseline
    assert DigitsFeatures()(torch.zeros(2, 1, 32, 32, dtype=torch.uint8)).shape == (2, 64)


def test_missing_inception_weights_name_the_file_to_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("PDM_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="weights-inception-2015-12-05-6726825d.pth") as e:
        inception_weights_path()
    assert "github.com/toshas/torch-fidelity" in str(e.value) and str(tmp_path) in str(e.value)


def test_metrics_cli_exit_code_2_when_weights_missing(tmp_path, monkeypatch):
    from pdm.metrics.__main__ import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("PDM_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["ref-stats", "--images", "digits", "--out", str(tmp_path / "r.npz")])
    assert e.value.code == 2


def test_metrics_cli_digits_commands(tmp_path, digits):
    from pdm.metrics.__main__ import main

    np.savez(tmp_path / "samples.npz", arr_0=digits[:300])
    main(
        [
            "ref-stats",
            "--images",
            "digits",
            "--feature",
            "digits",
            "--out",
            str(tmp_path / "ref.npz"),
        ]
    )
    fid = main(
        [
            "fid",
            "--images",
            str(tmp_path / "samples.npz"),
            "--ref",
            str(tmp_path / "ref.npz"),
            "--feature",
            "digits",
        ]
    )
    fd = main(["digits-fd", "--images", str(tmp_path / "samples.npz")])
    assert fid["fid"] == pytest.approx(fd["fd8x8"], rel=1e-9)
    assert fd["fd8x8"] < 1.0 and fd["real_vs_real_fd8x8"] < 1.0


def test_paired_quality_is_infinite_psnr_on_identity_and_falls_with_noise(digits):
    same = paired_quality(digits[:20], digits[:20])
    assert same["psnr"] > 100 and same["ssim"] == pytest.approx(1.0)
    a, b = (
        paired_quality(_noisy(digits[:20], 5), digits[:20]),
        paired_quality(_noisy(digits[:20], 30), digits[:20]),
    )
    assert a["psnr"] > b["psnr"] and a["ssim"] > b["ssim"]
    mse = ((_noisy(digits[:20], 5).astype(float) - digits[:20]) / 255) ** 2
    assert a["psnr"] == pytest.approx(
        float(np.mean(10 * np.log10(1 / mse.reshape(20, -1).mean(1)))), rel=1e-4
    )


def test_step_cost_reports_latency_and_memory_that_scale_with_the_grid():
    from pdm.nn import UNet

    small = measure_step_cost(
        UNet(
            image_size=32,
            patch_size=4,
            model_channels=32,
            channel_mult=(1,),
            attention_resolutions=(),
        ),
        batch=2,
        image_size=32,
        iters=2,
    )
    large = measure_step_cost(
        UNet(
            image_size=32,
            patch_size=1,
            model_channels=32,
            channel_mult=(1,),
            attention_resolutions=(),
        ),
        batch=2,
        image_size=32,
        iters=2,
    )
    assert small["images_per_second"] > 0 and small["peak_cuda_bytes"] is None
    assert large["activation_bytes"] > 8 * small["activation_bytes"]  # 16x the grid cells


class _ConvThenLinear(torch.nn.Module):
    """conv 3->8 (3x3, padding 1) on 6x6, then a linear 288->5: FLOPs countable by hand."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x, t, y=None):
        return self.fc(self.conv(x).flatten(1))


def test_flop_count_matches_the_hand_count_forward_and_backward():
    b = 4
    conv = 2 * b * 6 * 6 * 8 * 3 * 3 * 3  # one multiply-add per output element per kernel tap
    fc = 2 * b * 288 * 5
    x, t = torch.randn(b, 3, 6, 6), torch.zeros(b)
    assert count_flops(_ConvThenLinear(), x, t) == conv + fc
    # backward: weight grads of both layers and the input grad of fc (not of conv: x needs no grad)
    net = _ConvThenLinear()
    assert count_flops(net, x, t, train=True) == 2 * conv + 3 * fc
    assert all(
        p.grad is None for p in net.parameters()
    )  # the counting step leaves no gradients behind


def test_unet_training_step_counts_close_to_three_forward_passes():
    from pdm.nn import UNet

    net = UNet(
        image_size=16,
        in_channels=1,
        patch_size=2,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
    )
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 10.0)
    fwd, train = count_flops(net, x, t), count_flops(net, x, t, train=True)
    assert fwd > 0 and 2.7 < train / fwd <= 3.0


def test_peak_flops_by_device_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756.0e12
    assert peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops("Some Unknown GPU") is None


def test_digits_classifier_reads_real_digits_and_not_noise(digits):
    from pdm.data import load_digits_tensor
    from pdm.metrics import classifier_accuracy, real_digits_accuracy

    labels = load_digits_tensor(8)[1].numpy()
    assert real_digits_accuracy() > 0.98  # cross-validated: the ceiling for generated digits
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 32, 32, 1)).astype(np.uint8)
    assert classifier_accuracy(noise, labels[:300]) < 0.3
    shuffled = rng.permutation(labels[:300])
    assert (
        classifier_accuracy(digits[:300], shuffled) < 0.3
    )  # it reads the images, not the label order


def test_digits_fd_command_reports_accuracy_when_labels_are_given(tmp_path, digits):
    from pdm.data import load_digits_tensor
    from pdm.metrics.__main__ import main

    labels = load_digits_tensor(8)[1].numpy()
    pick = np.random.default_rng(1).permutation(len(digits))[
        :400
    ]  # the file is ordered by writer: draw at random
    np.savez(tmp_path / "s.npz", arr_0=digits[pick], arr_1=labels[pick])
    out = main(["digits-fd", "--images", str(tmp_path / "s.npz")])
    assert out["classifier_accuracy"] > 0.99 and out["fd_ratio_to_floor"] < 1.5


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d, g: _npz(d / "empty.npz", arr_0=np.zeros((0, 32, 32, 1), np.uint8)),
            "holds 0 images",
        ),
        (lambda d, g: _npz(d / "one.npz", arr_0=g[:1]), "holds 1 images"),
        (lambda d, g: _npz(d / "nchw.npz", arr_0=g[:5].transpose(0, 3, 1, 2)), "looks like NCHW"),
        (
            lambda d, g: _npz(d / "float.npz", arr_0=g[:5].astype(np.float32) / 255),
            "expected uint8",
        ),
        (lambda d, g: _npz(d / "nokey.npz", images=g[:5]), "has no arr_0"),
        (lambda d, g: _truncated(d, g), "not a readable .npz"),
        (lambda d, g: _corrupt_folder(d, g), "cannot read image"),
    ],
)
def test_metrics_cli_rejects_bad_images_in_one_line(tmp_path, capsys, digits, make, message):
    from pdm.metrics.__main__ import main

    path = make(tmp_path, digits)
    with pytest.raises(SystemExit) as e:
        main(["digits-fd", "--images", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def _truncated(d, g):
    _npz(d / "full.npz", arr_0=g[:50])
    (d / "cut.npz").write_bytes((d / "full.npz").read_bytes()[:300])
    return d / "cut.npz"


def _corrupt_folder(d, g):
    from PIL import Image

    (d / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(g[i, :, :, 0]).save(d / "imgs" / f"{i}.png")
    (d / "imgs" / "3.png").write_text("not a png")
    return d / "imgs"


def test_ref_stats_out_that_is_a_folder_is_refused(tmp_path, capsys):
    from pdm.metrics.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["ref-stats", "--images", "digits", "--feature", "digits", "--out", str(tmp_path)])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err
