"""Shared test set-up: one torch thread (the suite runs on 2-core CI machines shared with other jobs, where
intra-op threads only contend) and a headless matplotlib backend."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
