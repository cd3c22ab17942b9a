"""What every benchmark shares: timing, memory, the result format, and writing results.

A benchmark returns a `BenchResult`: rows of absolute numbers (each optionally with a ratio
against a baseline row measured in the same run), goals checked against their targets, and
notes (findings, recommendations). `write_results` turns a set of them into results.json and
results.md (one markdown table per benchmark, a machine line on top).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the folder holding the `prep` package (a clone, or site-packages)


# ------------------------------------------------------------------------------- timing
class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def best_of(fn: Callable[[], object], repeat: int = 1) -> float:
    """The fastest of `repeat` timed calls (seconds): the least disturbed by other load."""
    times = []
    for _ in range(max(1, repeat)):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return min(times)


# ------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process image so far (MiB).

    Linux: VmHWM from /proc/self/status, which starts afresh at exec. (ru_maxrss does not: a
    child forked from a big parent reports the parent's size as its own peak.)
    """
    found = _status_mb("VmHWM")
    if found is not None:
        return found
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _status_mb(field: str) -> float | None:
    """One kB figure of /proc/self/status in MiB (Linux); None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PrivatePeak:
    """Peak private (anonymous) memory of this process, sampled every `interval` s in a thread.

    RSS also counts the pages of memory-mapped files (the manifest's projection cache), which every
    rank and process of a node shares through the page cache; private memory is what each process
    adds, so what multiplies with the ranks. Linux only (0 elsewhere).
    """

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, private_mb())
            self._stop.wait(interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, private_mb())
        return self.peak_mb


def private_mb() -> float:
    """Resident anonymous memory of this process now (MiB): RssAnon of /proc/self/status."""
    return _status_mb("RssAnon") or 0.0


def peak_rss_children_mb() -> float:
    """Largest peak RSS among waited-for child processes so far (MB)."""
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return peak_rss_mb()


# ------------------------------------------------------------------------------ results
@dataclass
class Row:
    """One measured figure; `ratio` = value / value of the `baseline` row when given.

    `higher_is_better` says how to read the ratio (throughputs: True, seconds: False).
    """

    name: str
    value: float | None
    unit: str
    baseline: str | None = None
    ratio: float | None = None
    note: str = ""


@dataclass
class Goal:
    goal: str
    measured: float | None
    target: str
    met: bool | None  # None: not measurable here


@dataclass
class BenchResult:
    name: str
    status: str = "ok"  # ok | skipped | error | absent
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, name: str, value: float | None, unit: str, *, baseline: str | None = None,
            note: str = "", invert: bool = False) -> Row:
        """Add a row; with `baseline` its ratio against that earlier row is filled in.

        The ratio is value/baseline for throughputs; `invert=True` gives baseline/value (for
        times, so that > 1 still means "faster than the baseline").
        """
        ratio = None
        if baseline is not None:
            base = self.row(baseline).value
            if value and base:
                ratio = base / value if invert else value / base
        row = Row(name, value, unit, baseline, ratio, note)
        self.rows.append(row)
        return row

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def value(self, name: str) -> float | None:
        return self.row(name).value

    def goal(self, goal: str, measured: float | None, target: str, met: bool | None) -> None:
        self.goals.append(Goal(goal, measured, target, met))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> BenchResult:
        fields = dict(payload)
        fields["rows"] = [Row(**row) for row in fields.get("rows", [])]
        fields["goals"] = [Goal(**goal) for goal in fields.get("goals", [])]
        return cls(**fields)


def run_guarded(name: str, fn: Callable[[], BenchResult]) -> BenchResult:
    """Run one benchmark; an exception becomes an `error` result instead of stopping `all`."""
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a broken benchmark must not hide the others
        result = BenchResult(name, status="error")
        result.notes.append(f"{type(exc).__name__}: {exc}")
        result.extra["traceback"] = traceback.format_exc()
        print(result.extra["traceback"], file=sys.stderr)
    result.seconds = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------ machine
def machine_info(probe_torch: bool = True) -> dict:
    """CPU, cores, memory, accelerator and library versions: the context of every figure.

    Versions come from package metadata (no imports: importing torch & co. would add ~400 MB
    to this process, and children forked from it inherit that in ru_maxrss). The accelerator
    is probed in a short child process when `probe_torch`.
    """
    from importlib import metadata

    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    for module, dist in (("torch", "torch"), ("PIL", "pillow"), ("numpy", "numpy"), ("datasets", "datasets"),
                         ("diffusers", "diffusers"), ("transformers", "transformers"), ("accelerate", "accelerate")):
        try:
            info[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[module] = None
    if probe_torch:
        code = ("import json, torch; from prep.models import cpu_features; c = torch.cuda.is_available(); "
                "f = cpu_features(); print(json.dumps({'cuda': c, 'gpu': torch.cuda.get_device_name(0) if c else None, "
                "'torch_threads': torch.get_num_threads(), 'cpu_capability': f['capability'], "
                "'cpu_flags': f['flags'], 'native_bf16': f['native_bf16']}))")
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                 env=child_env())
            info.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            info["cuda"] = None
    try:
        from PIL import features

        info["libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception:  # noqa: BLE001
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_line(info: dict) -> str:
    """The CPU facts that decide the models' speed there (printed with every result)."""
    flags = " ".join(info.get("cpu_flags") or []) or "none of avx2/avx512f/avx512_bf16/amx"
    bf16 = "native bf16" if info.get("native_bf16") else "no native bf16 (bf16 emulated: slow)"
    return f"CPU kernels {info.get('cpu_capability', '?')}, flags: {flags}; {bf16}"


def machine_line(info: dict) -> str:
    gpu = info.get("gpu") or "no GPU"
    return (
        f"Machine: {info.get('cpu')}, {info.get('cores')} cores, {info.get('memory_gb', '?')} GiB, {gpu}; "
        f"{cpu_line(info)}; "
        f"load avg at start {info.get('load_avg_1m')}; Python {info.get('python')}, torch {info.get('torch')}, "
        f"Pillow {info.get('PIL')} (libjpeg-turbo {info.get('libjpeg_turbo')}), numpy {info.get('numpy')}, "
        f"datasets {info.get('datasets')}"
    )


# ------------------------------------------------------------------------------ writing
def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def _cell(text: object) -> str:
    return fmt(text).replace("|", "\\|").replace("\n", " ")


def markdown(results: list[BenchResult], info: dict, *, quick: bool, total_seconds: float | None = None) -> str:
    lines = ["# prep benchmarks", "", machine_line(info), ""]
    mode = "quick" if quick else "full"
    lines.append(f"Mode: {mode}" + (f"; total {total_seconds:.0f} s" if total_seconds is not None else ""))
    lines.append("")
    for result in results:
        lines.append(f"## {result.name} ({result.status}, {result.seconds:.1f} s)")
        lines.append("")
        if result.params:
            lines.append("Parameters: " + ", ".join(f"{k}={v}" for k, v in result.params.items()))
            lines.append("")
        if result.rows:
            lines.append("| metric | value | unit | ratio | vs | note |")
            lines.append("|---|---:|---|---:|---|---|")
            for row in result.rows:
                ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
                lines.append(
                    f"| {_cell(row.name)} | {_cell(row.value)} | {_cell(row.unit)} | {ratio} | "
                    f"{_cell(row.baseline)} | {_cell(row.note or '')} |"
                )
            lines.append("")
        if result.goals:
            lines.append("| goal | measured | target | met |")
            lines.append("|---|---:|---|---|")
            for goal in result.goals:
                met = "n/a" if goal.met is None else ("MET" if goal.met else "MISSED")
                lines.append(f"| {_cell(goal.goal)} | {_cell(goal.measured)} | {_cell(goal.target)} | {met} |")
            lines.append("")
        for note in result.notes:
            lines.append(f"- {note}")
        if result.notes:
            lines.append("")
    return "\n".join(lines)


def write_results(out: Path, results: list[BenchResult], *, quick: bool,
                  total_seconds: float | None = None, info: dict | None = None) -> tuple[Path, Path]:
    """DIR/results.json and DIR/results.md."""
    out.mkdir(parents=True, exist_ok=True)
    info = info or machine_info()
    payload = {
        "machine": info,
        "quick": quick,
        "total_seconds": total_seconds,
        "benchmarks": {r.name: r.to_dict() for r in results},
    }
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown(results, info, quick=quick, total_seconds=total_seconds) + "\n")
    return json_path, md_path


# --------------------------------------------------------------------------- processes
def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: repo importable, offline, no progress bars."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def run_child(cmd: list[str], *, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, raising with the tail of its output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No tqdm / datasets progress bars in benchmark output."""
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("prep").setLevel(logging.WARNING)
    yield


def cache_dir(default: str | None = None) -> Path:
    """Where generated inputs (images, models) are kept between runs."""
    path = Path(default or os.environ.get("PREP_BENCH_CACHE", "/tmp/prep-bench-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
