"""sample.py at scale: the network's precision, a compiled network, one command over many processes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode

import sample as sample_cli
from pdm.nn.runtime import FixedBatch, preferred_memory_format
from pdm.sampling import Settings

OLD = Settings(
    solver="dpmsolver++", order=2, grid="time_uniform"
)  # the sampler these tests were written for


def run_cli(*args, launcher=(), env=None):
    return subprocess.run(
        [sys.executable, *launcher, os.path.join(ROOT, "sample.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


def torchrun(n: int) -> tuple[str, ...]:
    return ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n))


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A tiny conditional model trained long enough (30 steps) to draw images, not grey fields."""
    from conftest import train_tiny

    return train_tiny(str(tmp_path_factory.mktemp("trained")), steps=30, num_classes=10, lr=2e-3)


def images(folder) -> np.ndarray:
    return np.load(os.path.join(folder, "samples.npz"))["arr_0"].astype(np.float64)


# --- precision -------------------------------------------------------------------------------------


def test_bf16_images_stay_within_3_of_255_of_fp32_and_differ(trained_ckpt, tmp_path):
    common = [
        "--ckpt",
        trained_ckpt,
        "--num-samples",
        "8",
        "--steps",
        "8",
        "--guidance-scale",
        "1.5",
        "--device",
        "cpu",
    ]
    sample_cli.main(common + ["--out", str(tmp_path / "fp32")])
    sample_cli.main(common + ["--out", str(tmp_path / "bf16"), "--precision", "bf16"])
    a, b = images(tmp_path / "fp32"), images(tmp_path / "bf16")
    assert a.std() > 20  # the images are not blank: the comparison says something
    diff = np.abs(a - b).mean()
    assert 0 < diff <= 3.0  # bf16 really ran, and only its rounding entered
    run = json.loads((tmp_path / "bf16" / "run.json").read_text())["identity"]["settings"]
    assert run["precision"] == "bf16" and run["compile"] is None


def test_another_precision_is_refused_in_an_fp32_folder(tiny_ckpts, tmp_path, capsys):
    common = [
        "--ckpt",
        tiny_ckpts["uncond"],
        "--num-samples",
        "2",
        "--steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    sample_cli.main(common)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_cli.main(common + ["--precision", "bf16"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "precision fp32 -> bf16" in err


def test_fp16_on_a_cpu_is_a_one_line_error(tiny_ckpts, tmp_path):
    res = run_cli(
        "--ckpt",
        tiny_ckpts["uncond"],
        "--out",
        tmp_path / "x",
        "--precision",
        "fp16",
        "--device",
        "cpu",
    )
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--precision bf16" in res.stderr
    assert not (tmp_path / "x").exists()


def test_compiled_bf16_on_a_cpu_is_refused_before_any_work(tiny_ckpts, tmp_path):
    # Inductor's vectorised CPU kernels turn whole samples of the bf16 LSUN/ImageNet networks
    # into NaN (benchmarks/RESULTS.md); the refusal names both ways that work.
    res = run_cli(
        "--ckpt",
        tiny_ckpts["uncond"],
        "--out",
        tmp_path / "x",
        "--precision",
        "bf16",
        "--compile",
        "--device",
        "cpu",
    )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--compile with fp32" in res.stderr and "without --compile" in res.stderr
    assert not (tmp_path / "x").exists()
    from pdm.nn import UNet
    from pdm.nn.runtime import compile_network

    with pytest.raises(ValueError, match="NaN images"):
        compile_network(
            UNet(
                in_channels=1, image_size=8, model_channels=32, channel_mult=(1,), num_res_blocks=1
            ).to(torch.bfloat16),
            2,
        )


def test_solver_state_stays_fp32_while_the_network_runs_bf16(tiny_ckpts):
    from pdm.checkpoints import load_for_sampling, load_model

    assert {p.dtype for p in load_model(tiny_ckpts["uncond"], "cpu", "bf16").net.parameters()} == {
        torch.bfloat16
    }
    loaded = load_for_sampling([tiny_ckpts["uncond"]], device="cpu", precision="bf16")
    x = torch.randn(3, 1, 16, 16)
    out = loaded.model_fn(x, torch.full((3,), 0.5))
    assert out.dtype == torch.float32 and out.shape == x.shape


def test_group_norm_statistics_are_fp32_under_half_precision():
    from pdm.nn.layers import group_norm

    torch.manual_seed(0)
    x = (torch.randn(2, 64, 8, 8) * 50 + 300).to(
        torch.bfloat16
    )  # a large mean: bf16 statistics would drift
    norm = group_norm(64)
    exact = torch.nn.functional.group_norm(x.double(), 32, eps=1e-5)
    ours = norm.to(torch.bfloat16)(x).double()
    assert ours.dtype == torch.float64 and float((ours - exact).abs().max()) < 0.02


# --- compilation -----------------------------------------------------------------------------------


def test_fixed_batch_pads_and_splits_without_changing_rows():
    calls = []

    def fn(x, t, y):
        return x * t[:, None] + (0 if y is None else y[:, None])

    def recorded(x, t, y):
        calls.append(x.shape[0])
        return fn(x, t, y)

    fixed = FixedBatch(recorded, 4)
    for rows in (4, 3, 1, 9):
        x, t, y = torch.randn(rows, 2), torch.rand(rows), torch.arange(rows).float()
        assert torch.equal(fixed(x, t, y), fn(x, t, y))
        assert torch.equal(fixed(x, t, None), fn(x, t, None))
    assert set(calls) == {4} and len(calls) == 2 * (1 + 1 + 1 + 3)  # 9 rows: three calls of 4


def test_a_short_last_batch_does_not_recompile():
    from pdm.nn import UNet
    from pdm.nn.runtime import compile_network

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else None)
        return gm.forward

    torch._dynamo.reset()
    net = UNet(
        in_channels=1,
        image_size=16,
        patch_size=4,
        model_channels=32,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
    ).eval()
    fixed = compile_network(net, 4)
    fixed.fn = torch.compile(
        net, backend=counting_backend, dynamic=False
    )  # count compilations, skip codegen
    with torch.no_grad():
        for rows in (4, 4, 3, 1, 6):
            fixed(torch.randn(rows, 1, 16, 16), torch.full((rows,), 10.0), None)
    assert len(graphs) == 1  # one graph for every batch size the run sends
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles the tiny network in ~30-50 s on 2 CPU cores
def test_compiled_images_agree_with_eager_within_1_of_255(trained_ckpt, tmp_path):
    common = [
        "--ckpt",
        trained_ckpt,
        "--num-samples",
        "5",
        "--batch-size",
        "2",
        "--steps",
        "6",
        "--guidance-scale",
        "1.5",
        "--device",
        "cpu",
    ]
    sample_cli.main(common + ["--out", str(tmp_path / "eager")])
    sample_cli.main(common + ["--out", str(tmp_path / "compiled"), "--compile"])
    assert np.abs(images(tmp_path / "eager") - images(tmp_path / "compiled")).max() <= 1.0


def test_compile_mode_without_compile_is_refused(tiny_ckpts, tmp_path):
    res = run_cli(
        "--ckpt", tiny_ckpts["uncond"], "--out", tmp_path / "x", "--compile-mode", "reduce-overhead"
    )
    assert res.returncode == 2 and "--compile-mode does nothing without --compile" in res.stderr


def test_memory_layout_follows_the_device_and_the_network_width():
    from pdm.nn import UNet
    from pdm.nn.runtime import network_width, place

    assert (
        preferred_memory_format("cuda", 512)
        == preferred_memory_format(torch.device("cuda", 1))
        == torch.channels_last
    )
    assert (
        preferred_memory_format("cpu", 256)
        == preferred_memory_format("cpu")
        == torch.contiguous_format
    )
    assert preferred_memory_format("cpu", 128) == torch.channels_last
    narrow = UNet(
        in_channels=1,
        image_size=16,
        patch_size=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
    )
    wide = UNet(
        in_channels=1,
        image_size=16,
        patch_size=4,
        model_channels=256,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
    )
    assert (network_width(narrow), network_width(wide)) == (64, 256)
    assert place(narrow, "cpu").input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert place(wide, "cpu").input_conv.weight.is_contiguous()


# --- many processes --------------------------------------------------------------------------------

SCALE_ARGS = [
    "--num-samples",
    "13",
    "--batch-size",
    "2",
    "--shard-size",
    "3",
    "--steps",
    "6",
    "--device",
    "cpu",
]


def test_two_torchrun_processes_write_the_one_process_bytes(tiny_ckpts, tmp_path):
    one = run_cli("--ckpt", tiny_ckpts["cond"], *SCALE_ARGS, "--out", tmp_path / "one")
    two = run_cli(
        "--ckpt", tiny_ckpts["cond"], *SCALE_ARGS, "--out", tmp_path / "two", launcher=torchrun(2)
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "two" / "samples.npz").read_bytes() == (
        tmp_path / "one" / "samples.npz"
    ).read_bytes()
    assert json.loads((tmp_path / "two" / "run.json").read_text())["info"]["processes"] == 2
    assert (
        json.loads((tmp_path / "two" / "stats.json").read_text())["images_sampled_this_run"] == 13
    )


def test_two_srun_tasks_write_the_one_process_bytes(tiny_ckpts, tmp_path):
    # srun starts N copies with SLURM's variables, here as SLURM 22.05 sets them for
    # `srun --ntasks 2`: no SLURM_NTASKS_PER_NODE (which Lightning's SLURM environment requires)
    one = run_cli("--ckpt", tiny_ckpts["cond"], *SCALE_ARGS, "--out", tmp_path / "one")
    assert one.returncode == 0
    port = str(20000 + os.getpid() % 20000)
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_JOB_ID": "777",
            "SLURM_JOB_NAME": "sample",
            "SLURM_NODELIST": "localhost",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(ROOT, "sample.py"),
                    "--ckpt",
                    tiny_ckpts["cond"],
                    *SCALE_ARGS,
                    "--out",
                    str(tmp_path / "srun"),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert (tmp_path / "srun" / "samples.npz").read_bytes() == (
        tmp_path / "one" / "samples.npz"
    ).read_bytes()
    assert json.loads((tmp_path / "srun" / "run.json").read_text())["info"]["processes"] == 2


@pytest.mark.parametrize(
    "environ, expected",
    [
        # SLURM 22.05, `srun --ntasks 4` on two nodes: no SLURM_NTASKS_PER_NODE
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}, (3, 4, 1)),
        # 23.02+, `srun --ntasks-per-node 2`; a step of 2 tasks inside a 4-task allocation
        (
            {
                "SLURM_NTASKS": "4",
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_PROCID": "1",
                "SLURM_LOCALID": "1",
            },
            (1, 2, 1),
        ),
        # an allocation's shell (salloc) and a machine without SLURM: one process
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "interactive"}, (0, 1, 0)),
        ({}, (0, 1, 0)),
    ],
)
def test_slurm_tasks_give_rank_and_world_size_on_every_version(environ, expected):
    from pdm.launch import slurm_launch

    launch = slurm_launch({"SLURM_JOB_NAME": "sample", **environ})
    assert (launch.rank, launch.world_size, launch.local_rank) == expected


def test_slurm_task_variables_that_make_no_rank_are_refused():
    from pdm.launch import slurm_launch

    with pytest.raises(ValueError, match="not a rank of 2 tasks"):
        slurm_launch({"SLURM_NTASKS": "2", "SLURM_PROCID": "2"})


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc")
@pytest.mark.slow  # 20 s: torchrun twice; the one-process resume is held by test_sample_cli
def test_killed_rank_resumes_with_another_process_count(tiny_ckpts, tmp_path):
    out = tmp_path / "run"
    args = [
        "--ckpt",
        tiny_ckpts["cond"],
        "--num-samples",
        "30",
        "--batch-size",
        "1",
        "--shard-size",
        "2",
        "--steps",
        "8",
        "--device",
        "cpu",
        "--out",
        out,
    ]
    proc = subprocess.Popen(
        [sys.executable, *torchrun(2), os.path.join(ROOT, "sample.py"), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("shard_*.npz.sha256"))) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers, "torchrun started no workers"
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    assert proc.wait(timeout=120) != 0
    # finished shards only: a kill between a shard and its hash leaves one the resume redoes
    kept = sorted(p.name for p in (out / "shards").glob("shard_*.npz.sha256"))
    assert 2 <= len(kept) < 15 and not (out / "samples.npz").exists()
    resumed = run_cli(*args)  # the same command on one process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["images_sampled_this_run"] <= 30 - 2 * len(
        kept
    )
    whole = run_cli(*args[:-1], tmp_path / "whole")
    assert whole.returncode == 0
    assert (out / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()


# --- the sampler's own cost ------------------------------------------------------------------------


class _SyncCounter:
    """Counts the ops that make a GPU wait for the host: reading a value out (``.item()``,
    ``bool()``, ``float()`` all reach ``_local_scalar_dense``) and data-dependent shapes
    (``nonzero``). On a CPU nothing waits, but the same ops run, so the count holds for CUDA."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket in (
                    torch.ops.aten._local_scalar_dense,
                    torch.ops.aten.nonzero,
                ):
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()


@pytest.mark.parametrize(
    "settings",
    [
        dict(solver="ipndm", order=4, skip_type="logSNR"),
        dict(solver="dpmsolver++", order=2, skip_type="time_uniform"),
        dict(solver="unipc", order=3, skip_type="logSNR"),
    ],
)
def test_the_plain_multistep_loop_reads_nothing_back_per_step(settings):
    from pdm.sampling import sample
    from pdm.schedule import VPSchedule
    from pdm.testing import GaussianMixture

    schedule = VPSchedule.linear()
    model_fn = GaussianMixture.random(components=3, shape=(1, 4, 4), seed=0).model_fn(schedule)
    counts = {}
    for steps in (5, 20):
        counter = _SyncCounter()
        with counter.mode:
            sample(model_fn, torch.randn(4, 1, 4, 4), schedule, steps=steps, **settings)
        counts[steps] = counter.count
    assert (
        counts[20] == counts[5] <= 2
    )  # a constant few (reading nfe out at the end), none per step


_ATEN = torch.ops.aten
_HOST_READS = {
    _ATEN._local_scalar_dense.default,
    _ATEN._linalg_check_errors.default,
    _ATEN.nonzero.default,
}


class _HostTraffic(TorchDispatchMode):
    """A dispatch mode counting what would stall a GPU: values read back to the host (``item``,
    ``bool``, error checks, ``nonzero``) and tensors copied from the host to the device. The
    "device" is ``meta``, so it runs on any machine; a read returns 0 instead of failing."""

    def __init__(self):
        super().__init__()
        self.reads, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            self.reads.append(str(func))
            if func is _ATEN._local_scalar_dense.default:
                return 0
        out = func(*args, **kwargs)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(a.device.type == "cpu" for a in inputs) and any(
            isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs
        ):
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize(
    "solver,order",
    [("ipndm", 4), ("dpmsolver++", 2), ("dpmsolver", 3), ("unipc", 3), ("deis", 3), ("ddim", 1)],
)
def test_the_multistep_loop_never_waits_for_the_device(solver, order):
    # On a GPU a host read or a pageable host-to-device copy synchronises: once per run is fine,
    # once per step serialises the sampler with the network. Counted on a 5- and a 20-step run,
    # each with a fresh schedule: the counts must not grow with the steps.
    from pdm.sampling import sample
    from pdm.schedule import build_schedule

    counts = {}
    for steps in (5, 20):
        schedule = build_schedule("linear", 1e-4, 0.02, 1000)
        noise = torch.empty(3, 3, 8, 8, device="meta")
        with _HostTraffic() as traffic:
            sample(
                lambda x, t: 0.1 * x, noise, schedule, OLD, steps=steps, solver=solver, order=order
            )
        counts[steps] = (len(traffic.reads), len(traffic.copies))
    assert counts[20] == counts[5], (
        f"{solver}: host reads / host-to-device copies {counts[5]} at 5 steps, {counts[20]} at 20"
    )
    assert counts[20][0] <= 1  # the mean NFE read out at the end
