"""Fault injection: SIGKILL the job at random moments, resume it, compare with an uninterrupted run.

    python -m prep.bench.faults --trials 20 [--procs 1|2] --out DIR [--seed 0] [--images 24]

One images folder and one tiny-models folder (under DIR) serve the reference and every trial,
so records (which hold absolute paths) compare equal. The reference is one uninterrupted run
of `prep/run.py` (all passes) followed by `prep export webdataset --resume`; its stderr is
timestamped to find when each pass starts, and an injected hook counts the atomic writes
(manifest rewrites, .npy side files, tar shards, other small files) of each process.

Each trial starts from an empty work dir and is killed once, by one of these scenarios
(cycled, so every pass, the manifest checkpoint and the export are hit):

- `time:<phase>`: SIGKILL at a seeded uniform moment inside that phase of the reference
  timeline (startup/scan, caption, t5, dinov3, vae, export);
- `event:<target>-<stage>`: an injected `prep.fsio.atomic_open` wrapper kills the job at the
  N-th (seeded, uniform over the reference's count) atomic write of a manifest, a .npy or a
  shard, either with the complete temp file on disk and not renamed (`pre`) or just after the
  rename (`post`, e.g. a shard renamed but its done-sidecar not written yet). A manifest changed
  in place (`prep.inplace`) counts its undo file: `pre` kills before the change starts, `post`
  halfway through the write of the new tail.

With `--procs 2` the job runs under `accelerate launch --multi_gpu --num_processes 2` and the
victim is, in turn, the whole process group, rank 0, rank 1 or the launcher alone.

Then the same commands are rerun until they succeed, and the trial survives when: the
manifest has the same records as the reference (and the same bytes), no record is lost or
duplicated, every side file and every shard / index / card is byte-identical, every .npy is
complete, no journal, rejected-lines file or `*.prep-tmp` is left, the work dir holds
exactly the reference's file names, and nothing was written to the sandboxed HOME / caches.
Prints `N/T survived` and writes DIR/faults-p{procs}.json.

Byte-identity needs identical batch composition (oneDNN picks other kernels for other batch
sizes, so VAE/T5 outputs can move by one fp16 ulp): the default batch sizes here are 1.
`--batch-size 2` shows what happens otherwise (mismatches report their max ulp distance).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the folder holding the `prep` package (a clone, or site-packages)
BUCKETS = "64x64,64x128,128x64,96x96"
TMP_MARK = ".prep-tmp"
PASSES = ("caption", "dinov3", "vae", "t5")  # the run order of the stages
PHASES = ("startup", *PASSES, "export")
EVENT_SCENARIOS = (
    "event:manifest-pre",
    "event:manifest-post",
    "event:npy-pre",
    "event:npy-post",
    "event:shard-pre",
    "event:shard-post",
)
SCENARIOS = tuple(f"time:{p}" for p in PHASES) + EVENT_SCENARIOS
# Compared without their bytes: the manifest (compared record by record, side-file mtimes
# left out) and its projection cache (which holds those mtimes).
VOLATILE = {"manifest.jsonl", "manifest.jsonl.cache.arrow"}
VICTIMS_2 = ("group", "rank0", "rank1", "launcher")
SETTLE_TIMEOUT = 240.0  # seconds the rest of a job may take to exit after one process is killed
RUN_TIMEOUT = 600.0

# The hook, installed with PYTHONPATH in every process of the job (also in the reference, in
# counting mode, so both run in the same environment). It wraps prep.fsio.atomic_open, which
# every file write of prep goes through, before any module binds it by name.
SITECUSTOMIZE = r'''
"""Fault injection for prep/bench/faults.py (generated). PREP_FAULT=target:stage:N, PREP_FAULT_LOG=file."""
import contextlib
import os
import signal
import threading

_SPEC = os.environ.get("PREP_FAULT", "")
_LOG = os.environ.get("PREP_FAULT_LOG", "")
if _SPEC or _LOG:
    from prep import fsio as _fsio

    _orig = _fsio.atomic_open
    _target, _stage, _n = (_SPEC.split(":") + ["", "", "0"])[:3] if _SPEC else ("", "", "0")
    _n = int(_n)
    _lock = threading.Lock()
    _count = [0]

    def _kind(path):
        name = os.path.basename(str(path))
        if name.endswith(".npy"):
            return "npy"
        if name.endswith(".tar"):
            return "shard"
        manifest = os.environ.get("PREP_FAULT_MANIFEST", "manifest.jsonl")
        if name in (manifest, manifest + ".undo"):  # a whole rewrite, or the undo file of an in-place one
            return "manifest"
        return "other"

    def _die():
        if os.environ.get("PREP_FAULT_ACTION", "group") == "group":
            if "LOCAL_RANK" in os.environ:  # a rank: the launcher and every rank (each in its own session)
                launcher = os.getppid()
                for entry in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{entry}/stat") as f:
                            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                        if ppid == launcher and int(entry) != os.getpid():
                            os.kill(int(entry), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                os.kill(launcher, signal.SIGKILL)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def _hit(path):
        """Log the write; True when it is the one to kill at (the N-th of the target kind on the target rank)."""
        kind = _kind(path)
        with _lock:
            if _LOG:
                with open(_LOG, "a") as log:
                    log.write(f"{os.getpid()} {os.environ.get('RANK', '0')} {kind} {os.path.basename(str(path))}\n")
            if kind == _target and os.environ.get("PREP_FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get(
                "RANK", "0"
            ):
                _count[0] += 1
                return _count[0] == _n
        return False

    @contextlib.contextmanager
    def atomic_open(path, mode="wb"):
        hit = _hit(path)
        with _orig(path, mode) as f:
            yield f
            if hit and _stage == "pre":
                f.flush()
                _die()
        if hit and _stage == "post":
            if str(path).endswith(".undo"):
                _torn[0] = True  # die halfway through the in-place write of the manifest's tail
            else:
                _die()

    _torn = [False]
    _fsio.atomic_open = atomic_open

    from prep import inplace as _inplace  # after the patch: it binds atomic_open by name

    _write_at = _inplace._write_at

    def write_at(path, start, data):
        if _torn[0]:
            with open(path, "r+b") as f:
                f.seek(start)
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()
        _write_at(path, start, data)

    _inplace._write_at = write_at

    # Side files of the passes: written to a temp file (write_temp), stamped in the journal,
    # then renamed into place (publish). "pre" kills with the temp on disk, "post" after the rename.
    from prep import store as _store

    _write_temp, _publish = _store.write_temp, _store.publish

    def write_temp(path, data):
        hit = _hit(path)
        tmp = _write_temp(path, data)
        if hit and _stage == "pre":
            _die()
        if hit and _stage == "post":
            _post.add(str(tmp))
        return tmp

    _post = set()

    def publish(tmp, path):
        _publish(tmp, path)
        if str(tmp) in _post:
            _die()

    _store.write_temp, _store.publish = write_temp, publish
'''


# ---------------------------------------------------------------------------- setup
@dataclass
class Setup:
    out: Path
    images: Path
    models: dict[str, Path]
    inject: Path
    procs: int
    batch_size: int
    base: Path | None = None  # a finished dataset every work dir starts from (hard links), or None
    shard_size: int = 4  # samples per shard: a few shards of the new images; a few hundred with a base


def extra_image_specs(n_images: int):
    """The default generated set (14 files, every format and mode) plus plain JPEGs up to n."""
    from prep.testing import DEFAULT_IMAGE_SPECS, ImageSpec

    specs = list(DEFAULT_IMAGE_SPECS)[:n_images]
    for i in range(max(0, n_images - len(specs))):
        specs.append(ImageSpec(f"extra_{i:03d}.jpg", 64 + 16 * (i % 9), 160 - 8 * (i % 11)))
    return specs


def prepare(out: Path, procs: int, n_images: int, batch_size: int, models: dict[str, Path] | None = None,
            base_records: int = 0) -> Setup:
    """Tiny models, one generated images folder and the hook, all under `out` (reused when present);
    with `base_records`, a finished dataset of that many records (as a real run writes them) that
    every work dir starts from, so the trials run against a manifest of realistic size."""
    from prep.testing import make_test_images, make_tiny_models

    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    if models is None:
        models = {k: Path(v) for k, v in make_tiny_models(out / "models").items()}
    images = out / f"images-{n_images}"
    if not images.is_dir():
        make_test_images(images.with_suffix(".partial"), extra_image_specs(n_images))
        os.replace(images.with_suffix(".partial"), images)
    inject = out / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    base = None
    if base_records:
        from prep.bench.data import build_real_dataset

        base = build_real_dataset(out / f"base-{base_records}", base_records, models, progress=False,
                                  caption_tokens=12)["manifest"].parent
    # 4 samples a shard gives the 24 new images several shards to die in; a base of 100k records
    # would make 25k of them (then per-shard fsyncs are 80% of a trial), so it gets ~400 shards
    shard_size = max(4, base_records // 400)
    return Setup(out, images, models, inject, procs, batch_size, base, shard_size)


def seed_work(s: Setup, work: Path) -> None:
    """An empty work dir, or (with a base dataset) a hard-linked copy of it: files are replaced by
    rename, so the base is never changed. The manifest is copied: a user's has one name, and
    prep writes the tail of such a manifest in place (a linked one it rewrites whole)."""
    if s.base is None:
        work.mkdir(parents=True)
        return
    shutil.copytree(s.base, work, copy_function=LinkOrCopy(),
                    ignore=shutil.ignore_patterns(".bench-real.json", "*.lock", "manifest.jsonl"))
    shutil.copy2(s.base / "manifest.jsonl", work / "manifest.jsonl")


class LinkOrCopy:
    """copytree's copy function: a hard link, and once the source inode takes no more links (a big
    base dataset already links up to 60,000 names to one inode), a copy that takes the next ones."""

    def __init__(self) -> None:
        self.spare: dict[tuple[int, int], str] = {}  # source inode -> the copy that takes its next links

    def __call__(self, src: str, dst: str) -> None:
        stat = os.stat(src)
        key = (stat.st_dev, stat.st_ino)
        try:
            os.link(self.spare.get(key, src), dst)
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            shutil.copy2(src, dst)  # same bytes and mtime: the records' file stamps hold
            self.spare[key] = dst


def run_cmd(s: Setup, work: Path) -> list[str]:
    args = [
        str(REPO / "prep" / "run.py"),
        "--images", str(s.images),
        "--manifest", str(work / "manifest.jsonl"),
        "--output-base-dir", str(work / "derived"),
        "--buckets", BUCKETS,
        "--min-free-gb", "0",
        "--batch-size", str(s.batch_size),
        "--text-batch-size", str(s.batch_size),
        "--caption-batch-size", str(s.batch_size),
        "--num-workers", "1",
        "--checkpoint-minutes", "0.0005",  # a fold every batch or so: checkpoints are hit too
        "--vae-model", str(s.models["vae"]),
        "--t5-model", str(s.models["t5"]),
        "--dinov3-model", str(s.models["dinov3"]),
        "--caption-model", str(s.models["captioner"]),
        "--caption-max-new-tokens", "12",
    ]  # fmt: skip
    if s.procs == 1:
        return [sys.executable, *args]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(s.procs), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *args]


def export_cmd(s: Setup, work: Path) -> list[str]:
    return [sys.executable, "-m", "prep", "export", "webdataset", "--input-jsonl", str(work / "manifest.jsonl"),
            "--derived-dir", str(work / "derived"), "--output-dir", str(work / "shards"),
            "--shard-size", str(s.shard_size), "--shuffle", "--seed", "0", "--resume"]


def job_env(s: Setup, root: Path, fault: str = "", action: str = "group") -> dict:
    """The environment of every command: the hook, offline, HOME and caches sandboxed under `root/home`."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        PYTHONPATH=f"{s.inject}{os.pathsep}{REPO}",
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        HF_HOME=str(home / ".cache" / "huggingface"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PREP_FAULT_LOG=str(root / "logs" / "writes.log"),
        PREP_FAULT_ACTION=action,
    )
    env.pop("PREP_FAULT", None)
    if fault:
        env["PREP_FAULT"] = fault
    return env


# -------------------------------------------------------------------------- running
@dataclass
class Outcome:
    rc: int | None
    seconds: float
    killed: str = ""  # what was killed ("" = ran to its end)
    note: str = ""
    marks: dict[str, float] = field(default_factory=dict)  # phase -> first seen (s)


def _processes() -> dict[tuple[int, int], int]:
    """(pid, start time) -> parent pid of every live (non-zombie) process.

    A process is known by its pid *and* its start time: pids are reused (pid_max may be
    32768), and a pid seen earlier in a job must never lead to signalling a stranger.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[(int(entry), int(fields[19]))] = int(fields[1])  # state, ppid, ..., starttime
    return found


def _ppids() -> dict[int, int]:
    return {pid: ppid for (pid, _), ppid in _processes().items()}


def identity(pid: int) -> tuple[int, int] | None:
    for key in _processes():
        if key[0] == pid:
            return key
    return None


def descendants(roots: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Live processes among `roots` ((pid, start time) pairs) and all their live descendants.

    torch's elastic launcher starts each rank in a session of its own, so a process group or
    session kill of the launcher does not reach the ranks: the job is followed by parentage.
    """
    processes = _processes()
    children: dict[int, list[tuple[int, int]]] = {}
    for key, ppid in processes.items():
        children.setdefault(ppid, []).append(key)
    found, todo = set(), [key for key in roots if key in processes]
    while todo:
        key = todo.pop()
        if key not in found:
            found.add(key)
            todo.extend(children.get(key[0], []))
    return found


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a rank under the accelerate launcher (a child with RANK=rank in its env)."""
    for pid, ppid in _ppids().items():
        if ppid != launcher:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def settle(job: set[tuple[int, int]], timeout: float) -> str:
    """Wait until no process of the job (and no descendant of one) is left; SIGKILL the rest after `timeout`."""
    deadline = time.monotonic() + timeout
    while alive := descendants(job):
        job |= alive
        if time.monotonic() > deadline:
            names = []
            for pid, _ in alive:
                with contextlib.suppress(OSError):
                    names.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return (f"{len(alive)} process(es) still alive {timeout:.0f}s after the launcher ended were SIGKILLed: "
                    f"{names}")
        time.sleep(0.1)
    return ""


def kill_victim(proc: subprocess.Popen, victim: str) -> str:
    """SIGKILL the victim; returns what was killed."""
    if victim in ("rank0", "rank1"):
        pid = rank_pid(proc.pid, int(victim[-1]))
        if pid is None:
            victim = "group"
        else:
            os.kill(pid, signal.SIGKILL)
            return victim
    if victim == "launcher":
        os.kill(proc.pid, signal.SIGKILL)
        return victim
    launcher = identity(proc.pid)
    for pid, _ in descendants({launcher} if launcher else set()):  # the launcher, the ranks, their workers
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return "group" if victim == "group" else f"group (no {victim} process yet)"


def landed_phase(marks: dict[str, float], at: float) -> str:
    """The phase a moment `at` falls in, from the pass marks seen so far."""
    phase = "startup"
    for kind in PASSES:
        if kind in marks and marks[kind] <= at:
            phase = kind
    return phase


def launch(cmd: list[str], env: dict, log: Path, *, kill_at: tuple[str, float] | None = None,
           victim: str = "group") -> Outcome:
    """Run `cmd` in its own session, then wait for every process of the job.

    `kill_at=(phase, delay)`: SIGKILL `victim` `delay` seconds after `phase` starts (after the
    start for "startup" / "export"; after the pass's "records need work" line for a pass).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    marks: dict[str, float] = {}
    with open(log, "ab") as sink:
        sink.write(f"\n$ {' '.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.PIPE, start_new_session=True, cwd=REPO)

        def pump() -> None:
            for line in iter(proc.stderr.readline, b""):
                sink.write(line)
                text = line.decode("utf-8", "replace")
                for kind in PASSES:
                    if f"prep: {kind}: " in text and "records need work" in text:
                        marks.setdefault(kind, time.monotonic() - started)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        killed, note = "", ""
        launcher = identity(proc.pid)
        job = {launcher} if launcher else set()
        last_scan = 0.0
        while proc.poll() is None:
            now = time.monotonic() - started
            if now - last_scan > 0.2:
                job |= descendants(job)
                last_scan = now
            if kill_at is not None:
                phase, delay = kill_at
                origin = 0.0 if phase in ("startup", "export") else marks.get(phase)
                if origin is not None and now >= origin + delay:
                    job |= descendants(job)
                    killed = kill_victim(proc, victim)
                    killed += f" at {now:.2f}s during {'export' if phase == 'export' else landed_phase(marks, now)}"
                    break
            if now > RUN_TIMEOUT:
                kill_victim(proc, "group")
                note = f"timed out after {RUN_TIMEOUT:.0f}s"
                break
            time.sleep(0.01)
        rc = proc.wait()
        note = note or settle(job, SETTLE_TIMEOUT)
        reader.join(timeout=10)
        if rc == -signal.SIGKILL and not killed:
            killed = "injected"
    return Outcome(rc, time.monotonic() - started, killed, note, marks)


# --------------------------------------------------------------------------- checks
def manifest_records(work: Path) -> list[dict]:
    path = work / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def listing(work: Path) -> set[str]:
    return {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}


def max_ulp(a: Path, b: Path) -> str:
    """How far two .npy files are apart, for the report of a mismatch."""
    import numpy as np

    from prep.store import load_npy

    x, y = load_npy(a), load_npy(b)
    if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
        return "unreadable or other shape/dtype"
    if x.dtype == np.float16:
        ulps = np.abs(x.view(np.int16).astype(np.int64) - y.view(np.int16).astype(np.int64))
    else:
        ulps = np.abs(x.view(np.int32).astype(np.int64) - y.view(np.int32).astype(np.int64))
    return f"max {int(ulps.max())} ulp, {int((ulps > 0).sum())} values differ"


def compare(ref: Path, work: Path, home: Path | None = None) -> list[str]:
    """Every way `work` differs from the reference `ref` (empty list = identical)."""
    if not (work / "manifest.jsonl").is_file():
        return ["no manifest"]
    expected = manifest_records(ref)
    problems = compare_records(ref, work) + compare_files(ref, work) + compare_shards(work, expected)
    if home is not None and home.is_dir():
        written = sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())
        if written:
            problems.append(f"wrote outside the work dir: {written[:5]}")
    return problems


def compare_records(ref: Path, work: Path) -> list[str]:
    """The manifests hold the same records, none lost or duplicated (side-file mtimes left out)."""
    from prep.testing import without_file_stamps

    problems = []
    records = [without_file_stamps(r, keep_hash=True) for r in manifest_records(work)]
    expected = [without_file_stamps(r, keep_hash=True) for r in manifest_records(ref)]
    ids = [r.get("image_id") for r in records]
    paths = [r.get("image_path") for r in records]
    if len(set(ids)) != len(ids) or len(set(paths)) != len(paths):
        problems.append("duplicated records")
    lost = {r["image_id"] for r in expected} - set(ids)
    if lost:
        problems.append(f"{len(lost)} records lost: {sorted(lost)[:5]}")
    if records != expected:
        differing = [r.get("image_id") for r, e in zip(records, expected, strict=False) if r != e]
        problems.append(f"manifest records differ ({len(records)} vs {len(expected)}; first differing: {differing[:3]})")
    elif [json.dumps(r) for r in records] != [json.dumps(e) for e in expected]:
        problems.append("manifest records differ in key order")
    if (work / "manifest.jsonl.journal").exists():
        problems.append("journal left behind")
    return problems


def compare_files(ref: Path, work: Path) -> list[str]:
    """The same file names, no temp file left, every file byte-identical (side files complete)."""
    from prep.fsio import sha256_file
    from prep.store import read_npy_header

    problems = []
    have, want = listing(work), listing(ref)
    temps = sorted(p for p in have if p.endswith(TMP_MARK))
    if temps:
        problems.append(f"{len(temps)} temp files left: {temps[:3]}")
    if have - want - set(temps):
        problems.append(f"unexpected files: {sorted(have - want - set(temps))[:5]}")
    if want - have:
        problems.append(f"missing files: {sorted(want - have)[:5]}")
    for rel in sorted(have & want):
        if rel.startswith("shards/.prep-export/") or rel in VOLATILE:
            continue  # resume state and caches: hold side-file mtimes, differ by design
        a, b = work / rel, ref / rel
        if os.path.samefile(a, b):
            continue  # both hard links to the base dataset's file: untouched by either run
        if rel.endswith(".npy") and read_npy_header(a) is None:
            problems.append(f"partial or unreadable {rel}")
        elif sha256_file(a) != reference_digest(b):
            extra = f" ({max_ulp(a, b)})" if rel.endswith(".npy") else ""
            problems.append(f"{rel} differs{extra}")
    return problems


@functools.cache
def _reference_digest(path: str, size: int, mtime_ns: int) -> str:
    from prep.fsio import sha256_file

    return sha256_file(path)


def reference_digest(path: Path) -> str:
    """The reference's files are read once per experiment, not once per trial (16 GB of shards at 100k)."""
    st = path.stat()
    return _reference_digest(str(path), st.st_size, st.st_mtime_ns)


def compare_shards(work: Path, expected: list[dict]) -> list[str]:
    """Every shard readable, every sample complete, each record exported exactly once."""
    import tarfile

    from prep.export.tarwriter import members

    per_sample = len(members(work / "derived"))
    problems, keys = [], []
    for tar_path in sorted((work / "shards").glob("bucket_*/*.tar")):
        try:
            with tarfile.open(tar_path) as tar:
                found = tar.getmembers()
        except (tarfile.TarError, OSError) as exc:
            problems.append(f"unreadable shard {tar_path.name}: {exc}")
            continue
        names = [m.name for m in found]
        keys += [n[: -len(".json")] for n in names if n.endswith(".json")]
        if len(names) != per_sample * len([n for n in names if n.endswith(".json")]) or not all(m.isreg() for m in found):
            problems.append(f"shard {tar_path.name} has incomplete samples")
    if len(keys) != len(set(keys)) or set(keys) != {r["image_id"] for r in expected}:
        problems.append(f"shards hold {len(keys)} samples ({len(set(keys))} distinct), expected {len(expected)}")
    return problems


# --------------------------------------------------------------------------- trials
@dataclass
class Reference:
    work: Path
    run_seconds: float
    export_seconds: float
    marks: dict[str, float]
    writes: dict[str, int]  # target kind -> count in the busiest process (for event:N)
    export_writes: dict[str, int]
    rank_writes: dict[str, dict[str, int]] = field(default_factory=dict)  # rank -> kind -> count

    def phase_length(self, phase: str) -> float:
        """How long `phase` lasted in the reference (seconds)."""
        if phase == "export":
            return self.export_seconds
        edges = [0.0, *[self.marks.get(p, 0.0) for p in PASSES], self.run_seconds]
        i = PHASES.index(phase)
        return max(edges[i + 1] - edges[i], 0.05)


def count_writes(log: Path, rank: str | None = None) -> dict[str, int]:
    """The largest number of atomic writes of each kind made by one process (of `rank`), from the hook's log."""
    per: dict[tuple[str, str], int] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            pid, line_rank, kind, _ = line.split(" ", 3)
            if rank is None or line_rank == rank:
                per[(pid, kind)] = per.get((pid, kind), 0) + 1
    counts: dict[str, int] = {}
    for (_, kind), n in per.items():
        counts[kind] = max(counts.get(kind, 0), n)
    return counts


def make_reference(s: Setup) -> Reference:
    """One uninterrupted run + export, timed; its phase marks and write counts drive the trials."""
    root = s.out / f"reference-p{s.procs}"
    shutil.rmtree(root, ignore_errors=True)
    work = root / "work"
    seed_work(s, work)
    env = job_env(s, root)
    ran = launch(run_cmd(s, work), env, root / "logs" / "run.log")
    if ran.rc != 0:
        raise RuntimeError(f"reference run failed (rc {ran.rc}); see {root / 'logs' / 'run.log'}")
    run_writes = count_writes(root / "logs" / "writes.log")
    rank_writes = {str(r): count_writes(root / "logs" / "writes.log", str(r)) for r in range(s.procs)}
    os.replace(root / "logs" / "writes.log", root / "logs" / "writes-run.log")
    exported = launch(export_cmd(s, work), env, root / "logs" / "export.log")
    if exported.rc != 0:
        raise RuntimeError(f"reference export failed (rc {exported.rc}); see {root / 'logs' / 'export.log'}")
    export_writes = count_writes(root / "logs" / "writes.log")
    return Reference(work, ran.seconds, exported.seconds, ran.marks, run_writes, export_writes, rank_writes)


@dataclass
class TrialResult:
    index: int
    scenario: str
    victim: str
    plan: str
    killed: str
    runs: int
    exports: int
    seconds: float
    problems: list[str]
    notes: list[str]

    @property
    def exercised(self) -> bool:
        """The planned fault happened (an event planned past the run's own count of writes kills nothing)."""
        return not self.killed.startswith("nothing")

    @property
    def survived(self) -> bool:
        return self.exercised and not self.problems


@dataclass
class FaultPlan:
    """When and how one trial dies: at a moment of a phase, or at the N-th write of a kind."""

    text: str
    victim: str
    in_export: bool
    fault: str = ""  # "target:stage:N" for the injected hook
    kill_at: tuple[str, float] | None = None  # (phase, seconds into it)


def plan_fault(ref: Reference, scenario: str, victim: str, rng: random.Random) -> FaultPlan:
    kind, what = scenario.split(":", 1)
    in_export = what == "export" or what.startswith("shard")
    if kind == "time":
        length = ref.phase_length(what)
        kill_at = (what, rng.uniform(0.0, length))
        text = f"kill {victim} {kill_at[1]:.2f}s into {what} (it lasted {length:.1f}s in the reference)"
        return FaultPlan(text, victim, in_export, kill_at=kill_at)
    target, stage = what.split("-")
    if victim.startswith("rank") and not ref.rank_writes.get(victim[-1], {}).get(target):
        victim = "rank0"  # only rank 0 writes the manifest
    counts = ref.export_writes if in_export else ref.rank_writes.get(victim[-1], {}) if victim.startswith(
        "rank") else ref.writes
    total = counts.get(target, 0)
    # checkpoints fold by time, so a run's count of manifest writes follows the machine's speed
    # (47 to 60 for the same work): plan within the first two thirds, which every run reaches
    reach = total * 2 // 3 if target == "manifest" else total
    n = rng.randint(1, max(1, reach))
    text = f"die at {target} write {n}/{total} ({'temp complete, not renamed' if stage == 'pre' else 'just renamed'})"
    return FaultPlan(text, victim, in_export, fault=f"{target}:{stage}:{n}")


@dataclass
class Attempts:
    """Runs a command until it succeeds: the first attempt with the fault, the others plain."""

    victim: str
    plain_env: dict
    max_attempts: int = 4
    killed: str = ""
    notes: list[str] = field(default_factory=list)

    def until_done(self, cmd: list[str], first_env: dict | None, first_kill, log: Path) -> int:
        for attempt in range(self.max_attempts):
            faulty = attempt == 0 and (first_env is not None or first_kill is not None)
            outcome = launch(cmd, first_env if faulty and first_env else self.plain_env, log,
                             kill_at=first_kill if faulty else None, victim=self.victim)
            if faulty:
                self.killed = outcome.killed or (
                    f"injected (the job exited with rc {outcome.rc})" if outcome.rc else
                    f"nothing (finished in {outcome.seconds:.1f}s)"
                )
            if outcome.note:
                self.notes.append(outcome.note)
            if outcome.rc == 0 and not (faulty and outcome.killed):
                return attempt + 1
            if not faulty:
                self.notes.append(f"a plain rerun failed with rc {outcome.rc} (see {log})")
        raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} did not complete in {self.max_attempts} attempts")


def run_trial(s: Setup, ref: Reference, index: int, scenario: str, victim: str, rng: random.Random) -> TrialResult:
    root = s.out / f"trials-p{s.procs}" / f"{index:03d}"
    shutil.rmtree(root, ignore_errors=True)
    work = root / "work"
    seed_work(s, work)
    started = time.monotonic()
    plan = plan_fault(ref, scenario, victim, rng)
    victim = plan.victim
    killed_env = job_env(s, root, plan.fault, "self" if victim in ("rank0", "rank1") else "group")
    if victim in ("rank0", "rank1") and not plan.in_export:
        killed_env["PREP_FAULT_RANK"] = victim[-1]  # only that rank dies at its N-th write
    tries = Attempts(victim, job_env(s, root))
    runs = exports = 0
    try:
        runs = tries.until_done(run_cmd(s, work), killed_env if plan.fault and not plan.in_export else None,
                                plan.kill_at if not plan.in_export else None, root / "logs" / "run.log")
        exports = tries.until_done(export_cmd(s, work), killed_env if plan.fault and plan.in_export else None,
                                   plan.kill_at if plan.in_export else None, root / "logs" / "export.log")
        problems = compare(ref.work, work, root / "home")
    except RuntimeError as exc:
        problems = [str(exc)]
    problems += [n for n in tries.notes if n.startswith("a plain rerun failed")]  # a resume must just work
    if not problems:
        shutil.rmtree(work, ignore_errors=True)  # keep the logs; a copy of 100k records and shards is 17 GB
    return TrialResult(index, scenario, victim, plan.text, tries.killed, runs, exports, time.monotonic() - started,
                       problems, tries.notes)


@dataclass
class FaultReport:
    procs: int
    trials: list[TrialResult]
    reference_seconds: float
    reference_marks: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return sum(t.survived for t in self.trials)

    def to_dict(self) -> dict:
        return {
            "procs": self.procs,
            "survived": self.survived,
            "trials_run": len(self.trials),
            "not_exercised": sum(not t.exercised for t in self.trials),
            "reference_seconds": self.reference_seconds,
            "reference_marks": self.reference_marks,
            "notes": self.notes,
            "trials": [asdict(t) for t in self.trials],
        }


def run_faults(out: str | Path, *, trials: int = 20, procs: int = 1, seed: int = 0, n_images: int = 24,
               batch_size: int = 1, scenarios: tuple[str, ...] = SCENARIOS, models: dict[str, Path] | None = None,
               verbose: bool = True, base_records: int = 0) -> FaultReport:
    """The whole experiment (importable): reference, `trials` killed-and-resumed runs, comparison."""
    s = prepare(Path(out), procs, n_images, batch_size, models, base_records)
    ref = make_reference(s)
    report = FaultReport(procs, [], ref.run_seconds, ref.marks)
    if verbose:
        marks = ", ".join(f"{k} {v:.1f}s" for k, v in ref.marks.items())
        print(f"reference ({procs} proc): run {ref.run_seconds:.1f}s ({marks}), export {ref.export_seconds:.1f}s; "
              f"writes {ref.writes}, export writes {ref.export_writes}", flush=True)
    other = s.out / f"reference-p{3 - procs}" / "work"
    if procs in (1, 2) and (other / "shards" / "index.json").exists():
        diff = compare(other, ref.work)
        report.notes.append(f"reference vs reference-p{3 - procs}: " + ("identical" if not diff else "; ".join(diff[:4])))
    rng = random.Random(seed)
    for i in range(trials):
        scenario = scenarios[i % len(scenarios)]
        victim = VICTIMS_2[(i // len(scenarios) + i) % len(VICTIMS_2)] if procs > 1 else "group"
        if scenario.startswith("event:") and victim == "launcher":
            victim = "group"  # an injected fault dies inside a rank: the group or that rank
        if scenario == "time:export":
            victim = "group"  # the export is one plain process
        result = run_trial(s, ref, i, scenario, victim, rng)
        report.trials.append(result)
        if verbose:
            status = ("ok" if result.survived else "FAILED: " + "; ".join(result.problems[:3]) if result.problems
                      else "NOT EXERCISED (the planned fault never came)")
            extra = f" [{'; '.join(result.notes)}]" if result.notes else ""
            print(f"trial {i:02d} {scenario:<20} {result.plan}; killed {result.killed}; "
                  f"{result.runs} run(s) + {result.exports} export(s), {result.seconds:.0f}s: {status}{extra}",
                  flush=True)
    (s.out / f"faults-p{procs}.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prep.bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--procs", type=int, choices=(1, 2), default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=24, help="generated images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="all three batch sizes (default: %(default)s)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these scenarios (repeatable)")
    parser.add_argument("--base-records", type=int, default=0, metavar="N",
                        help="start every run from a finished dataset of N records as a real run writes them "
                             "(hard links), so the manifest has a realistic size (default: empty)")
    args = parser.parse_args(argv)
    report = run_faults(args.out, trials=args.trials, procs=args.procs, seed=args.seed, n_images=args.images,
                        batch_size=args.batch_size, scenarios=tuple(args.scenario or SCENARIOS),
                        base_records=args.base_records)
    for note in report.notes:
        print(note)
    missed = sum(not t.exercised for t in report.trials)
    print(f"{report.survived}/{len(report.trials)} survived" + (f" ({missed} not exercised)" if missed else ""))
    return 0 if report.survived == len(report.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
