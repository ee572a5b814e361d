"""Launching processes: local torchrun and Slurm."""
