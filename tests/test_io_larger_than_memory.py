"""A checkpoint larger than the machine's memory (sparse files) is analysed with a small, bounded footprint."""

from __future__ import annotations

import json
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
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's (pytest's) peak into a child across exec
    child = (
        "import re, sys; from lmsurgeon.cli import main; code = main(sys.argv[1:]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print('peak_rss', int(hwm) * 1024); sys.exit(code)"
    )
    p = subprocess.run(
        [sys.executable, "-c", child, "inspect", str(tmp_path / "big"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    peak = int(p.stdout.split("peak_rss")[1])
    assert peak < GIB, f"peak RSS {peak / 2**20:.0f} MiB reading norms of a {size / GIB:.0f} GiB checkpoint"
    assert f"norms read: {2 * layers + 1}," in p.stdout  # every layer's two norms and the final norm


def test_lineage_naive_report_on_two_checkpoints_larger_than_ram_stays_under_1_gib(tmp_path):
    layers = 16
    while True:
        size = write_sparse_llama(tmp_path / "a", n_layers=layers, seed=0)
        if size > ram_bytes():
            break
        layers *= 2
    write_sparse_llama(tmp_path / "b", n_layers=layers, seed=1)
    out = tmp_path / "run"
    child = (
        "import json, re, sys; from lmsurgeon.lineage import compare; "
        "res = compare(sys.argv[1:3], out=sys.argv[3], naive_only=True); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print(json.dumps({'peak': int(hwm) * 1024, 'bytes': [m['bytes_read'] for m in res['models']], "
        "'raw': res['pairs'][0]['naive']['mean_raw_cosine']}))"
    )
    p = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "a"), str(tmp_path / "b"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stdout.strip().splitlines()[-1])
    assert facts["peak"] < GIB, f"peak RSS {facts['peak'] / 2**20:.0f} MiB on two {size / GIB:.0f} GiB checkpoints"
    assert all(b < 4 * 2**20 for b in facts["bytes"])  # norms only: megabytes of tens of gigabytes
    assert facts["raw"] is not None
    assert (out / "report.html").is_file()
