"""A sampling run's output folder (:mod:`~pdm.outputs.folder`) and the making of its images
(:mod:`~pdm.outputs.run`)."""

from pdm.atomic import file_sha256
from pdm.outputs.folder import (
    PIXEL_CODE,
    code_fingerprint,
    describe_difference,
    hash_path,
    is_recorded,
    merge_parts,
    prepare_out,
    read_identity,
    read_info,
    save_npz,
    shard_paths,
    shard_state,
    write_manifest,
    write_outputs,
)
from pdm.outputs.job import Request, sample_to_folder
from pdm.outputs.run import Interrupt, Run, make_shard, noise_and_label

__all__ = [
    "PIXEL_CODE",
    "Interrupt",
    "Request",
    "Run",
    "code_fingerprint",
    "describe_difference",
    "file_sha256",
    "hash_path",
    "is_recorded",
    "make_shard",
    "merge_parts",
    "noise_and_label",
    "prepare_out",
    "read_identity",
    "read_info",
    "sample_to_folder",
    "save_npz",
    "shard_paths",
    "shard_state",
    "write_manifest",
    "write_outputs",
]
