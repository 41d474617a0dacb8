"""The GPU tier's one fixture: NVML on this machine's real GPUs, or a skip
that says why (the tier runs on a lent GPU machine; see README.md here)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def nvml():
    try:
        import pynvml
    except ImportError as e:
        pytest.skip(f"pynvml cannot be imported ({e}): install nvidia-ml-py")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA GPU here (nvmlInit: {e}); tests/gpu runs on a machine with GPUs")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("the NVIDIA driver is loaded but sees no GPU here")
        yield pynvml
    finally:
        pynvml.nvmlShutdown()
