"""Security audit, kept true by tests: the source of prep/ is scanned so unsafe patterns cannot creep
in, and the cheap behaviours are checked directly.

- nothing is ever unpickled: no `allow_pickle=True`, no pickle-family import, no `torch.load`
  without `weights_only=True`, no `np.load` (it opens .npz archives too; prep reads .npy with
  `np.lib.format.read_array(..., allow_pickle=False)`);
- model repos run no code of their own unless the user passes `--trust-remote-code`;
- no eval/exec, no shell, no unsafe YAML, no tar extraction to disk;
- a Hub token is never printed or logged (the behaviour is in tests/test_hub.py);
- tar members are checked on read (absolute paths, `..`, links).
"""

from __future__ import annotations

import ast
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

import prep
from prep import loading
from prep.cli import build_parser

PREP = Path(prep.__file__).resolve().parent
SOURCES = sorted(PREP.rglob("*.py"))
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SECRET_NAMES = {"token", "hf_token", "api_token", "auth_token", "access_token", "secret", "password"}
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _secret_in(node: ast.AST) -> bool:
    """An argument that is (or formats) a variable or attribute named like a secret."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id.lower() in SECRET_NAMES:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr.lower() in SECRET_NAMES:
            return True
    return False


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe pattern in one Python source (line: what)."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{where}: imports {name}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in {a.name for a in node.names}:
                found.append(f"{where}: imports torch.load by name (its weights_only cannot be checked)")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            for arg, default in [*zip(positional, defaults, strict=True), *zip(args.kwonlyargs, args.kw_defaults,
                                                                                strict=True)]:
                if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                    found.append(f"{where}: trust_remote_code defaults to something other than False")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if _is_true(keywords.get("allow_pickle")):
            found.append(f"{where}: allow_pickle=True")
        if _is_true(keywords.get("trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
        if name == "torch.load" and not _is_true(keywords.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load"):
            found.append(f"{where}: np.load (use np.lib.format.read_array with allow_pickle=False)")
        if name in ("eval", "exec", "os.system", "os.popen", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {name}()")
        if _is_true(keywords.get("shell")):
            found.append(f"{where}: shell=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{where}: {name} (use yaml.safe_load)")
        attr = node.func.attr if isinstance(node.func, ast.Attribute) else ""
        if attr in ("extractall", "extract"):
            found.append(f"{where}: archive extraction to disk")
        is_log = name == "print" or attr in LOG_METHODS
        if is_log and any(_secret_in(arg) for arg in [*node.args, *keywords.values()]):
            found.append(f"{where}: prints or logs a secret")
    return found


def test_the_scanner_finds_each_pattern() -> None:
    bad = '''
import pickle
from dill import loads
import numpy as np, torch, yaml, os, subprocess, tarfile, logging
np.lib.format.read_array(f, allow_pickle=True)
np.save(f, a, allow_pickle=True)
np.load(f)
torch.load(p)
torch.load(p, weights_only=False)
AutoModel.from_pretrained(m, trust_remote_code=True)
def load(model, trust_remote_code=True): ...
def load2(model, *, trust_remote_code=None): ...
eval("1")
os.system("ls")
subprocess.run("ls", shell=True)
yaml.load(text)
tarfile.open(p).extractall(d)
print(f"using {token}")
logging.getLogger("x").info("token %s", self.token)
logger.debug("hub token: %s", hf_token)
'''
    found = violations(bad)
    assert len(found) == 18, "\n".join(found)
    good = '''
import numpy as np, torch, logging
np.lib.format.read_array(f, allow_pickle=False)
torch.load(p, weights_only=True)
AutoModel.from_pretrained(m, trust_remote_code=trust_remote_code)
def load(model, trust_remote_code=False): ...
def load3(model, *, trust_remote_code: bool = False): ...
print(f"tokens: {len(tokens)}", token_env)
logger.info("read the token from %s", token_env)
'''
    assert violations(good) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PREP).as_posix())
def test_source_has_no_unsafe_pattern(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8"), path.relative_to(PREP).as_posix()) == []


def test_plain_grep_agrees() -> None:
    """Belt and braces: the literal spellings, anywhere in prep/ (comments and strings too)."""
    pattern = re.compile(r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True|pickle\.loads?\(")
    hits = [f"{p.relative_to(PREP)}:{n}" for p in SOURCES
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []


# --------------------------------------------------------------------------- behaviour
def test_trust_remote_code_is_off_unless_asked(monkeypatch) -> None:
    from prep import stages
    from prep.models import ResolvedModel
    from prep.options import run_options_from
    from prep.stages.caption import Captioner
    from prep.stages.dinov3 import DINOv3Encoder

    seen = {}
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, *a, **k: seen.setdefault("caption", k)))
    monkeypatch.setattr(DINOv3Encoder, "load", classmethod(lambda cls, *a, **k: seen.setdefault("dinov3", k)))
    model = ResolvedModel("--x-model", "x", True, None, "sha256:0")
    for argv, expected in ((["run"], False), (["run", "--trust-remote-code"], True)):
        seen.clear()
        opts = run_options_from(build_parser().parse_args(argv))
        assert opts.trust_remote_code is expected
        for name in ("caption", "dinov3"):
            stages.get(name).load(model, device="cpu", dtype="auto", opts=opts)
        assert seen["caption"]["trust_remote_code"] is expected and seen["dinov3"]["trust_remote_code"] is expected


@pytest.mark.parametrize("name", ["..\\evil.json", "C:evil.json", "a\x00b.json", "", "/abs.json", "x/../../y.json"])
def test_more_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unsafe tar member name"):
        loading.check_member_name(name)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("link", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_members_are_never_followed(tmp_path: Path, link: bytes) -> None:
    """A member that links to a file outside (or inside) the archive is not read as data."""
    secret = tmp_path / "secret.npy"
    secret.write_bytes(_npy(np.full(4, 7, np.float32)))
    bucket = tmp_path / "shards" / "bucket_64x64"
    bucket.mkdir(parents=True)
    members = {"k.json": b'{"image_id": "k"}', "k.t5m.npy": _npy(np.zeros(77, np.uint8)),
               "k.t5h.npy": _npy(np.zeros(2, np.float16)), "k.dinov3.npy": _npy(np.zeros(2, np.float32))}
    with tarfile.open(bucket / "shard-000000.tar", "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("k.vae.npy")
        info.type = link
        info.linkname = str(secret) if link == tarfile.SYMTYPE else "k.dinov3.npy"
        tar.addfile(info)
    with pytest.raises(ValueError, match="lacks member"):
        list(prep.load_shards(tmp_path / "shards"))

