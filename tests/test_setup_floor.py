"""launch/setup.sh keeps an installed torch, and says in one line when it is older than the floor."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_an_installed_torch_older_than_the_floor_is_one_clear_line(tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.3.1+cu121"\n')  # a GPU user's older CUDA build
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "setup.sh", repo / "launch" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    venv_py = repo / ".venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    venv_py.chmod(0o755)
    (venv_py.parent / "pip").write_text("#!/bin/sh\necho pip must not run >&2; exit 9\n")  # nothing installed
    (venv_py.parent / "pip").chmod(0o755)
    proc = subprocess.run(["bash", "launch/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch 2.3.1+cu121 is older than himae-dist's floor torch>=2.4" in lines[0], lines
    assert "keep your CUDA build" in lines[0]
    floor = next(ln for ln in (ROOT / "pyproject.toml").read_text().splitlines() if '"torch>=' in ln)
    assert '"torch>=2.4"' in floor  # the script's floor is pyproject's
