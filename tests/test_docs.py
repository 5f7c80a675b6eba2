"""Every ```python block of README.md and docs/*.md runs, in order per file (issue #23).

Each file's blocks share one namespace and one temporary working directory, as a reader
pasting them one after the other into a session would. Timing loops are capped by
``AIGC_OPT_MAX_ITERS`` (3 rounds), so ``ao.compare(...)`` in a doc costs a few calls per model.

HTML comments on the lines right before a block steer it (invisible on a rendered page):

- ``<!-- skip: needs TensorRT and a CUDA GPU -->``: not run; the reason shows in pytest's summary.
- ``<!-- requires: onnxruntime, cuda -->``: skipped unless these modules import (``cuda``: unless
  a CUDA GPU is present).
- ``<!-- file: myquant.py -->``: written to that file in the working directory (which is on
  ``sys.path``) instead of run, for a later block to import.
- ``<!-- setup:`` ... ``-->``: hidden code run first, in the same namespace (e.g. a small
  ``model`` and ``calib`` for a block that shows only the call).

A block's traceback names the markdown file and its line.
"""

from __future__ import annotations

import gc
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ITERS = "3"  # $AIGC_OPT_MAX_ITERS for the blocks

_DIRECTIVE = re.compile(r"<!--\s*(skip|requires|file|setup)\s*:(.*?)-->", re.S)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None = None
    requires: tuple[str, ...] = ()
    file: str | None = None
    setup: str = ""
    setup_line: int = 0

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, with the directives in the comments just above."""
    text = path.read_text()
    blocks = []
    for fence in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, fence.start(1)) + 1
        block = Block(path=path, line=line, code=fence.group(1))
        # Directives: HTML comments directly above the fence (blank lines between them allowed).
        before = text[:fence.start()]
        while True:
            stripped = before.rstrip()
            if not stripped.endswith("-->"):
                break
            start = stripped.rfind("<!--")
            match = _DIRECTIVE.fullmatch(stripped[start:])
            if start < 0 or match is None:
                break
            kind, value = match.group(1), match.group(2)
            if kind == "skip":
                block.skip = value.strip()
            elif kind == "requires":
                block.requires = tuple(v.strip() for v in value.split(",") if v.strip())
            elif kind == "file":
                block.file = value.strip()
            else:
                block.setup = value.strip("\n")
                block.setup_line = text.count("\n", 0, start + match.start(2)) + 2
            before = stripped[:start]
        blocks.append(block)
    return blocks


BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)]


@dataclass
class DocRun:
    """One markdown file's session: its module (classes defined in a block pickle by reference,
    as from a script's ``__main__``), its directory, how far it got."""

    workdir: Path
    module: types.ModuleType
    done: int = 0  # blocks run so far
    failed: str | None = None
    skipped: bool = False

    @property
    def namespace(self) -> dict[str, Any]:
        return vars(self.module)


_RUNS: dict[Path, DocRun] = {}


def _check_readme(namespace: dict[str, Any], workdir: Path) -> None:
    # The quickstart's promises: the loaded model is the saved one, its history replayed, the
    # recipe written.
    again, fast, x = namespace["again"], namespace["fast"], namespace["x"]
    assert torch.allclose(again(x), fast(x), atol=1e-5)
    assert [r.pass_type for r in again.history] == ["Quantize", "Compile"]
    assert (workdir / "recipe.yaml").read_text().startswith("aigc_opt_recipe: 1")


# Checks run after a file's last block, on what its blocks left behind.
AFTER_FILE = {"README.md": _check_readme}


def _missing(block: Block) -> str | None:
    for req in block.requires:
        if req == "cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA GPU"
        elif importlib.util.find_spec(req) is None:
            return f"needs {req} (not installed)"
    return None


def _registries() -> dict[Any, list[str]]:
    """Every aigc_opt registry and its names, to undo what a doc registers (e.g. a quant method)."""
    from aigc_opt._registry import Registry

    found = {}
    for name, module in list(sys.modules.items()):
        if name == "aigc_opt" or name.startswith("aigc_opt."):
            for value in vars(module).values():
                if isinstance(value, Registry):
                    found[value] = value.names()
    return found


def _execute(block: Block, run: DocRun) -> None:
    if block.file:
        (run.workdir / block.file).write_text(block.code)
        return
    for code, line in ((block.setup, block.setup_line), (block.code, block.line)):
        if code:
            # Padded so that a traceback's line numbers are the markdown file's.
            exec(compile("\n" * (line - 1) + code, str(block.path), "exec"), run.namespace)


@pytest.fixture(scope="module", autouse=True)
def _doc_sessions():
    registries = _registries()
    modules = set(sys.modules)
    yield
    for registry, names in registries.items():  # what the docs registered, unregistered
        for name in set(registry.names()) - set(names):
            registry.unregister(name)
    for name in set(sys.modules) - modules:  # the docs' own modules (myquant.py), forgotten
        origin = str(getattr(sys.modules[name], "__file__", None) or "")
        if name.startswith("_doc_") or any(origin.startswith(str(r.workdir)) for r in _RUNS.values()):
            del sys.modules[name]
    _RUNS.clear()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, tmp_path_factory, monkeypatch):
    path = block.path
    if path not in _RUNS:
        module = types.ModuleType(f"_doc_{path.stem}")
        sys.modules[module.__name__] = module
        _RUNS[path] = DocRun(workdir=tmp_path_factory.mktemp(path.stem), module=module)
    run = _RUNS[path]
    monkeypatch.chdir(run.workdir)
    monkeypatch.syspath_prepend(str(run.workdir))
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", ITERS)
    own = [b for b in BLOCKS if b.path == path]
    index = own.index(block)
    try:
        # Run the blocks before this one first when they have not run (e.g. under -k).
        for earlier in own[run.done:index + 1]:
            if run.failed:
                pytest.skip(f"an earlier block of {path.name} failed ({run.failed})")
            reason = earlier.skip or _missing(earlier)
            run.skipped |= reason is not None
            if reason is None:
                try:
                    _execute(earlier, run)
                except BaseException:
                    run.failed = earlier.id
                    raise
            run.done += 1
            if earlier is block and reason is not None:
                pytest.skip(reason)
        if index == len(own) - 1 and path.name in AFTER_FILE and not run.skipped:
            AFTER_FILE[path.name](run.namespace, run.workdir)
    finally:
        if index == len(own) - 1:  # the file's models (MiniLM, compiled copies) freed before the next file
            run.namespace.clear()
            gc.collect()


def test_every_doc_file_is_collected():
    # The collector sees every python block: none hidden by a fence it does not recognise.
    for path in DOC_FILES:
        text = path.read_text()
        fences = len(re.findall(r"^```python", text, re.M))
        assert fences == len(parse_blocks(path)), path
    assert any(b.path.name == "README.md" for b in BLOCKS)


def test_directives_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n<!-- skip: needs TensorRT and a CUDA GPU -->\n```python\nraise SystemExit\n```\n\n"
        "<!-- requires: onnxruntime, cuda -->\n\n```python\nx = 1\n```\n"
        "<!-- file: helper.py -->\n```python\nVALUE = 2\n```\n"
        "<!-- setup:\nimport math\ny = math.pi\n-->\n```python\nprint(y)\n```\n"
        "```python\nplain = True\n```\n")
    skip, req, file, setup, plain = parse_blocks(page)
    assert skip.skip == "needs TensorRT and a CUDA GPU" and skip.line == 5
    assert req.requires == ("onnxruntime", "cuda") and req.skip is None
    assert _missing(req) in (None, "needs a CUDA GPU")
    assert file.file == "helper.py" and file.code == "VALUE = 2\n"
    assert setup.setup == "import math\ny = math.pi" and setup.setup_line == 18
    assert page.read_text().splitlines()[setup.setup_line - 1] == "import math"
    assert (plain.skip, plain.requires, plain.file, plain.setup) == (None, (), None, "")
