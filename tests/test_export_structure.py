"""The export's code stays in small pieces: plan, readiness, tar writer, resume state, fields."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from helpers_export import build_dataset

import prep
from prep.export import readiness as readiness_module
from prep.export import webdataset
from prep.manifest import read_manifest

EXPORT_DIR = Path(webdataset.__file__).parent
OWN_MODULES = sorted(p for p in EXPORT_DIR.glob("*.py") if p.name not in ("card.py", "hub.py"))
MAX_FUNCTION_LINES = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", OWN_MODULES, ids=lambda p: p.name)
def test_no_function_over_60_lines(path):
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(path) if f.end_lineno - f.lineno + 1 > 60}
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_split_into_modules_without_the_old_indirections():
    names = {p.stem for p in OWN_MODULES}
    assert {"plan", "readiness", "tarwriter", "resume"} <= names
    assert not hasattr(webdataset, "RecordLookup")
    package = Path(prep.__file__).parent
    helpers = [
        f"{p.relative_to(package)}:{f.name}"
        for p in sorted(package.rglob("*.py"))
        for f in _functions(p)
        if "sha256" in f.name and "file" in f.name
    ]
    assert helpers == ["fsio.py:sha256_file"], helpers


def test_readiness_returns_a_dataclass(tmp_path):
    data = build_dataset(tmp_path)
    ready = readiness_module.readiness(read_manifest(data["manifest"]), data["derived"])
    assert dataclasses.is_dataclass(ready)
    assert len(ready.rows) == len(data["ready"]) and ready.not_ready == 5 and ready.excluded == 0
    assert ready.reasons == data["reasons"]
    assert sorted(ready.bucket_names[c] for c in ready.codes) == sorted(
        r["aspect_bucket"] for r in data["records"] if r["image_id"] in data["ready"]
    )
