"""Marks on the device's timeline: CUDA events on a GPU, ``perf_counter`` on the CPU.

CUDA events are recorded on the stream, so a mark costs no synchronisation and measures GPU
work, not Python dispatch; the elapsed time is read once the end event has completed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["Timer"]


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A point in time: a recorded ``torch.cuda.Event`` or a ``perf_counter`` value."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from mark ``start`` to mark ``end``."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start
