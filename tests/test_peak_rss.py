"""peak_rss_bytes measures this process, not the parent it was started from (ru_maxrss keeps a big parent's size
through fork and exec: every benchmark subprocess once reported its parent's 4.8 GiB)."""

import subprocess
import sys

import torch

from hf_prune.utils import peak_rss_bytes


def test_a_child_of_a_big_process_reports_its_own_peak():
    big = torch.ones(2**28)  # 1 GiB, touched, resident in this (parent) process
    assert peak_rss_bytes() >= 2**30
    child = subprocess.run(
        [sys.executable, "-c", "from hf_prune.utils import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True,
        text=True,
        check=True,
    )
    del big
    assert int(child.stdout.split()[-1]) < 2**30


SOLVE_IN_PLACE = """
import torch
from hf_prune.methods.sparsegpt.solver import inverse_cholesky_upper_

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def hessian(n):
    X = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(0))
    return X.t() @ X / (2 * n)

inverse_cholesky_upper_(hessian(256), 0.01)  # LAPACK's and the thread pool's own set-up is not the solve's
n = 4096
work = hessian(n)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident size
inverse_cholesky_upper_(work, 0.01)
print(status("VmHWM:") - before, work.numel() * 4)
"""


def test_the_sparsegpt_solve_needs_no_second_hessian_sized_matrix():
    """The factorisation, inverse and second factorisation run in the Hessian's own memory: the process's peak
    resident size grows by less than half an n x n float32 matrix (each LAPACK call on a row-major matrix allocated
    one: 3 x 0.8 GiB at a 14336-wide down projection)."""
    child = subprocess.run([sys.executable, "-c", SOLVE_IN_PLACE], capture_output=True, text=True, check=True)
    growth, matrix = map(int, child.stdout.split()[-2:])
    assert growth < matrix // 2, (growth, matrix)
