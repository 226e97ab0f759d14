"""One sample.py job: what it asks for (:class:`Request`) and the whole run (:func:`sample_to_folder`):
load the model, claim the folder, make the shards, write the final files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdm.atomic import file_sha256
from pdm.outputs.run import Interrupt, Run


@dataclass(frozen=True)
class Request:
    """What one sample.py invocation asks for, besides the sampler :class:`~pdm.sampling.Settings`."""

    ckpt: list[str]
    out: Path
    num_samples: int = 64
    batch_size: int = 64
    shard_size: int = 64
    guidance_scale: float = 1.0
    labels: list[int] | None = None
    seed: int = 0
    precision: str = "fp32"
    compile_mode: str | None = None
    num_shards: int = 1
    shard_index: int = 0
    overwrite: bool = False
    progress: bool = False
    split_log_snr: float | None = None

    def identity(self, settings, ckpt_hashes: list[str]) -> dict:
        """Everything that decides which images land in the shards (see :mod:`pdm.outputs.folder`)."""
        from pdm import __version__
        from pdm.outputs.folder import code_fingerprint

        run = {
            "guidance_scale": self.guidance_scale,
            "labels": self.labels,
            "seed": self.seed,
            "precision": self.precision,
            "compile": self.compile_mode,
        }
        if self.split_log_snr is not None:  # an expert pair routed at another split
            run["split_log_snr"] = self.split_log_snr
        if (
            settings.method == "per_image"
        ):  # its network calls are padded to the batch: part of the pixels
            run["batch_size"] = self.batch_size
        return {
            "pdm_version": __version__,
            "code": code_fingerprint(),
            "checkpoints": sorted(ckpt_hashes),
            "settings": {**settings.record(), **run},
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
        }


def sample_to_folder(
    request: Request,
    settings,
    learned=None,
    device: torch.device | None = None,
    interrupt: Interrupt | None = None,
    schedule_name: str = "the schedule",
    force_schedule: bool = False,
) -> dict:
    """Load the model, make this invocation's shards of ``request.out`` with ``settings`` (or the
    learned schedule ``learned``, checked to be calibrated for these checkpoints unless
    ``force_schedule``) and, once all shards exist, the final outputs; returns the stats.

    Under torchrun or srun every rank runs this: rank 0 prepares the folder, the shards still
    missing are dealt out round-robin, and rank 0 writes the final files when all ranks are done.
    """
    from dataclasses import replace

    from pdm.checkpoints import load_for_sampling
    from pdm.launch import detect

    launch = detect()
    device = launch.device(device)
    launch.start(device)
    try:
        loaded = load_for_sampling(
            request.ckpt,
            request.guidance_scale,
            device,
            request.precision,
            request.compile_mode,
            request.batch_size,
            fixed_batch=settings.method
            == "per_image",  # a row's pixels never depend on its batch-mates
            split_log_snr=request.split_log_snr,
        )
        _check_labels(request.labels, loaded.num_classes)
        hashes = [file_sha256(p) for p in request.ckpt]
        if learned is not None:
            if not force_schedule:  # an export's own schedules travel with its weights
                made = (
                    learned.calibrated_for.get("checkpoints")
                    if schedule_name.endswith("embedded")
                    else None
                )
                learned.check_calibrated_for(
                    made or hashes, request.guidance_scale, list(request.ckpt), schedule_name
                )
            settings = replace(
                learned.settings_for(loaded.schedule),
                skip=settings.skip,
                denoise_to_zero=settings.denoise_to_zero,
                thresholding=settings.thresholding,
            )
        interrupt = interrupt or Interrupt()
        try:
            return _make_and_write(request, settings, loaded, hashes, launch, device, interrupt)
        finally:  # the folder is free again, however the run ended
            if interrupt.run is not None and interrupt.run.lock is not None:
                interrupt.run.lock.release()
    finally:
        launch.stop()


def _make_and_write(
    request: Request,
    settings,
    loaded,
    hashes: list[str],
    launch,
    device: torch.device,
    interrupt: Interrupt,
) -> dict:
    """Claim the folder, make this rank's shards and (rank 0, once all exist) the final files."""
    from pdm.outputs.folder import write_outputs

    run = Run(
        request.out,
        request.num_samples,
        request.shard_size,
        request.num_shards,
        request.shard_index,
        launch,
    )
    run.claim(
        request.identity(settings, hashes),
        request.overwrite,
        list(request.ckpt),
        {
            "device": str(device),
            "batch_size": request.batch_size,
            "torch": torch.__version__,
            "processes": launch.world_size,
            "model": loaded.config,
            "ckpt": list(request.ckpt),
        },
    )
    interrupt.run = run
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    batch = _checked_batch(loaded, settings, request, interrupt.check)
    done = run.make(
        batch, shape, loaded.num_classes, request.seed, request.labels, request.batch_size, device
    )
    missing = run.missing()
    if missing:
        return {"images_sampled_this_run": done, "shards_missing": missing}
    if launch.rank != 0:
        return {"images_sampled_this_run": done, "written_by_rank": 0}
    return write_outputs(
        run.out,
        run.paths,
        loaded.num_classes is not None,
        loaded.image_size,
        done,
        settings.skip is not None,
        _network_record(loaded, done) if launch.world_size == 1 else None,
    )


def _network_record(loaded, images: int) -> dict:
    """Calls per expert and sampling FLOPs per image of this run's images."""
    from pdm.metrics.cost import count_call_flops

    count_call_flops(loaded.experts)
    return loaded.network_record(images)


def _check_labels(labels: list[int] | None, num_classes: int | None) -> None:
    if labels is None:
        return
    if num_classes is None:
        raise ValueError("--labels given for an unconditional model; drop --labels")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(
            f"class labels {bad} are out of range for {num_classes} classes (use 0..{num_classes - 1})"
        )


def _checked_batch(
    loaded, settings, request: Request, check_interrupt: Callable[[], None]
) -> Callable:
    """``batch(noise, model_kwargs)``: sample one batch, refusing non-finite images."""
    from pdm.sampling import sample

    def batch(noise: torch.Tensor, model_kwargs: dict):
        check_interrupt()
        try:
            return sample_one(noise, model_kwargs)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            raise ValueError(
                f"a batch of {noise.shape[0]} images does not fit in memory on {noise.device} "
                f"({str(e).splitlines()[0][:120]}); try --batch-size {max(1, noise.shape[0] // 8)}"
            ) from None

    def sample_one(noise: torch.Tensor, model_kwargs: dict):
        res = sample(
            loaded.model_fn,
            noise,
            loaded.schedule,
            settings,
            prediction=loaded.prediction,
            model_kwargs=model_kwargs,
            progress=request.progress,
        )
        if not bool(torch.isfinite(res.x).all()):  # one read-back per batch, none per step
            hint = (
                "fp16 overflowed; use --precision bf16 (same speed on recent GPUs, fp32's range)"
                if request.precision == "fp16"
                else "the checkpoint may be broken (NaN weights?)"
            )
            raise ValueError(f"sampling produced non-finite values: {hint}")
        return res

    # per-image step control: continuous batching, a finished image's slot takes the next one
    if settings.method == "per_image":

        def images(items):
            from pdm.sampling.per_image import stream

            for index, x, nfe in stream(
                loaded.model_fn,
                loaded.schedule,
                settings,
                request.batch_size,
                items,
                loaded.prediction,
            ):
                check_interrupt()
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(
                        "sampling produced non-finite values: the checkpoint may be broken"
                    )
                yield index, x, nfe

        batch.stream = images
    return batch
