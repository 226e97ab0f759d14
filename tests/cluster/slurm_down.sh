#!/usr/bin/env bash
# Stop the single-node SLURM that tests/cluster/slurm_up.sh started.
scancel --user="$(id -un)" >/dev/null 2>&1 || true
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true
exit 0
