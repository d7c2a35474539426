"""A real kill: SIGKILL the whole `distann build` process group mid-build, then rerun."""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np

import distann
from tests.ann_helpers import cli, first_build, wait_for_staged_chunks


def test_killed_build_leaves_old_index_and_resumes(tmp_path):
    common = ["--workers", "2", "--chunk-rows", "2000", "--niter", "4"]
    src, url = first_build(tmp_path, 60_000, "IVF8,Flat", *common)
    xq = np.load(src)[:20]
    _, I_old = distann.open_index(url).search(xq, k=5, nprobe=2)

    # a rebuild with another nlist, killed (SIGKILL, client and cluster alike) once add tasks finish
    proc = subprocess.Popen(cli("build", src, url, "--spec", "IVF16,Flat", "--overwrite", *common, quiet=True),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_staged_chunks(proc, url, generation=2, count=3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    old = distann.open_index(url)                      # the committed index is intact
    assert old.nlist == 8
    np.testing.assert_array_equal(old.search(xq, k=5, nprobe=2)[1], I_old)

    subprocess.run(cli("build", src, url, "--spec", "IVF16,Flat", "--overwrite", *common, quiet=True),
                   check=True, timeout=300)
    new = distann.open_index(url)
    assert new.nlist == 16 and new.manifest.build["resumed_chunks"] >= 3
    assert np.array_equal(np.sort(new.lists.load_all().ids), np.arange(60_000))
