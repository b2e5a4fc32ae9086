"""Every script under scripts/ imports: a benchmark that no longer imports is found here, not on the GPU box."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # as `python scripts/x.py` runs it: its folder first
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # module level only: every script runs under `if __name__ == "__main__"`
    assert path.name == "bench_common.py" or callable(getattr(module, "main", None))
