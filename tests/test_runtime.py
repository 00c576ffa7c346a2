"""tune_memory: freed full-image arrays are reused without new page faults."""
import subprocess
import sys

import pytest

# a child process: the tuning is process-wide and must not leak into the other tests
CHILD = """
import resource, sys
import numpy as np
from snakedrp.runtime import tune_memory
tuning = tune_memory()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones((4176, 2048), np.float32)  # one full HSC CCD, 34 MB
    b = a * 2
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuning.malloc, faults[-1])
"""


def test_tune_memory_reuses_freed_images():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    malloc, faults = out.split()
    if malloc != "True":
        pytest.skip("not glibc: tune_memory leaves the allocator alone")
    # untuned, each round faults in two 34 MB arrays again (~17,000 4 kB pages)
    assert int(faults) < 500


def test_tune_memory_switches_numpy_hugepage_and_reports_the_old_setting():
    out = subprocess.run([sys.executable, "-c", "from snakedrp.runtime import tune_memory, _set_numpy_hugepage\n"
                          "tune_memory(hugepage=False)\nprint(_set_numpy_hugepage(True))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("False", "None")
