"""Load one file of femeta as it was at an earlier git revision, for side-by-side timings."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def load_revision(revision: str, path: str) -> ModuleType:
    """Import ``path`` (e.g. ``femeta/losses.py``) at ``revision`` as a module of its own.

    It must still import against this checkout's other modules.
    """
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    name = f"{Path(path).stem}_at_revision"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module
