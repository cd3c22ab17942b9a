"""`prep demo`: the whole flow offline, from a fresh folder, well under two minutes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prep.cli import main


def test_demo_runs_every_step_offline_and_says_where_to_look(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert main(["demo", str(tmp_path / "demo")]) == 0
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    assert elapsed < 120, elapsed
    for step in ("prep run", "prep verify", "prep export webdataset", "load back", "prep report"):
        assert step in out
    assert "verify                0.0 s  OK" in out or " OK" in out
    assert "meaningless" in out and str(tmp_path / "demo" / "report" / "index.html") in out
    demo = tmp_path / "demo"
    assert (demo / "report" / "index.html").is_file()
    index = json.loads((demo / "data" / "shards" / "index.json").read_text())
    assert index["samples"] == 14
    # a second demo in the same folder works too (the export is replaced, the dataset resumes)
    assert main(["demo", str(demo)]) == 0
