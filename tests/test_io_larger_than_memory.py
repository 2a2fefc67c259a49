"""A checkpoint larger than the machine's memory (sparse files) is analysed with a small, bounded footprint."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.tiny_checkpoints import write_sparse_llama

GIB = 2**30


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_norm_report_on_a_checkpoint_larger_than_ram_stays_under_1_gib(tmp_path):
    layers = 16
    while True:  # grow until the apparent size exceeds this machine's RAM (sparse: costs no disk)
        size = write_sparse_llama(tmp_path / "big", n_layers=layers)
        if size > ram_bytes():
            break
        layers *= 2
    out = tmp_path / "run"
    child = ("import resource, sys; from lmsurgeon.cli import main; code = main(sys.argv[1:]); "
             "print('peak_rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(code)")
    p = subprocess.run([sys.executable, "-c", child, "inspect", str(tmp_path / "big"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    peak = int(p.stdout.split("peak_rss")[1])
    assert peak < GIB, f"peak RSS {peak / 2**20:.0f} MiB reading norms of a {size / GIB:.0f} GiB checkpoint"
    assert f"norms read: {2 * layers + 1}," in p.stdout  # every layer's two norms and the final norm
