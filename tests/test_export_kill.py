"""kill -9 during a parallel export, then --resume: byte-identical to an uninterrupted export.

The export runs in a subprocess with two worker processes, slowed down around each shard's
atomic write (so the kill lands mid-export, with temp files on disk), and is SIGKILLed: the
whole process group, or the parent alone (its workers must die with it, not write on).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_export import build_dataset, tar_bytes

from prep import store
from prep.export.webdataset import export_webdataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + PR_SET_PDEATHSIG: Linux")

SLOW_EXPORT = textwrap.dedent("""
    import contextlib, sys, time
    import prep.fsio as fsio

    real = fsio.atomic_open

    @contextlib.contextmanager
    def slow(path, mode="wb"):
        with real(path, mode) as f:
            if str(path).endswith(".tar"):
                time.sleep(0.15)  # an empty temp file on disk
            yield f
            if str(path).endswith(".tar"):
                time.sleep(0.15)  # a complete temp file, not renamed yet
    fsio.atomic_open = slow  # before prep.export binds it; inherited by the forked workers

    from prep.export.webdataset import export_webdataset
    manifest, derived, out = sys.argv[1:4]
    export_webdataset(manifest, derived, out, shard_size=1, shuffle=True, seed=3, progress_every=0, num_workers=2)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    data = build_dataset(tmp_path_factory.mktemp("kill_data"), per_bucket=8)
    vae = np.load(store.artifact_path(data["derived"], "vae", "img_0004"))
    vae[1, 1, 1] = np.inf  # one sample the writer skips: skips must survive the kill too
    store.save_artifact(data["derived"], "vae", "img_0004", vae)
    return data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill_reference") / "shards"
    export_webdataset(data["manifest"], data["derived"], out, shard_size=1, shuffle=True, seed=3, progress_every=0,
                      num_workers=1)
    return out


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _alive(pid: int) -> bool:
    """A live process of ours (its command line is the slowed export: never a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = b"fsio.atomic_open = slow" in f.read()
    except OSError:
        return False
    return ours and state != "Z"


def _start_and_kill(data, out: Path, *, group: bool) -> list[int]:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, str(data["manifest"]), str(data["derived"]), str(out)],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(list(out.glob("bucket_*/*.tar"))) < 4:
        assert proc.poll() is None, "the export ended before it could be killed"
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.01)
    workers = _children(proc.pid)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return workers


@pytest.mark.parametrize("group", [True, False], ids=["process-group", "parent-only"])
def test_sigkill_mid_export_then_resume_is_byte_identical(data, reference, tmp_path, group):
    out = tmp_path / "shards"
    workers = _start_and_kill(data, out, group=group)
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:  # do not leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "workers outlived their parent: no orphan may write on"

    assert not (out / "index.json").exists()
    expected = tar_bytes(reference)
    done = tar_bytes(out)
    assert 4 <= len(done) < len(expected)
    for rel, content in done.items():  # every final-named shard is complete
        assert content == expected[rel], rel

    s = export_webdataset(data["manifest"], data["derived"], out, shard_size=1, shuffle=True, seed=3,
                          progress_every=0, num_workers=2, resume=True)
    assert s.kept_shards >= 1 and s.skipped_at_write == {"vae invalid: non-finite values": 1}
    assert tar_bytes(out) == expected
    for name in ("index.json", "stats.json", "README.md"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.rglob("*.prep-tmp"))
