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
