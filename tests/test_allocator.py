"""The allocator tuning really stops large freed blocks from being page-faulted again."""

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, json, os, resource, sys
import numpy as np
from vtbench import allocator

class OlderGlibc:  # refuses mmap thresholds above 32 MiB, as glibc releases before 2.35 do
    def __init__(self):
        self.libc = ctypes.CDLL(None)
    def mallopt(self, param, value):
        if param == allocator._M_MMAP_THRESHOLD and value > 32 << 20:
            return 0
        return self.libc.mallopt(param, value)

if os.environ.get("OLDER_GLIBC"):
    tuned = allocator._tune(OlderGlibc())
else:
    tuned = allocator.keep_freed_memory()

def touch():  # allocate, write and free 64 MiB, like one batch's activations
    block = np.empty(64 << 20, np.uint8)
    block.fill(1)
    del block

touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _second_allocation_faults(env_value: str, older_glibc: bool = False) -> dict:
    env = {**os.environ, "VT_KEEP_FREED_MEMORY": env_value, "OLDER_GLIBC": "1" if older_glibc else ""}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning")
def test_freed_blocks_are_reused_without_page_faults():
    plain = _second_allocation_faults("0")
    tuned = _second_allocation_faults("1")
    assert plain["tuned"] is False and tuned["tuned"] is True
    # Untuned, glibc unmaps the 64 MiB block on free and the next one faults in fresh pages.
    assert plain["faults"] > 0
    assert tuned["faults"] * 10 < plain["faults"]



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning")
def test_a_glibc_that_caps_the_mmap_threshold_is_tuned_by_turning_mmap_off():
    plain = _second_allocation_faults("0")
    fallback = _second_allocation_faults("1", older_glibc=True)
    assert fallback["tuned"] is True
    assert fallback["faults"] * 10 < plain["faults"]
