"""Every script in benchmarks/ runs as ``python benchmarks/<script>.py --help`` (its imports
and module-level code, as a user meets them; the quick runs of the scripts themselves are
tested next to what they measure)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))

# One process for all (torch is imported once): each script runs as __main__ with --help.
CHILD = """
import runpy, sys
failed = []
for name in sys.argv[1:]:
    sys.argv = [f"benchmarks/{name}", "--help"]
    try:
        runpy.run_path(f"benchmarks/{name}", run_name="__main__")
        failed.append(f"{name}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{name}: --help exited with {e.code!r}")
    except BaseException as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("FAILED:" + "; ".join(failed) if failed else "ALL OK")
"""


def test_every_benchmark_script_starts():
    assert "simulate_paper.py" in SCRIPTS and "compile_time.py" in SCRIPTS
    res = subprocess.run([sys.executable, "-c", CHILD, *SCRIPTS], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ALL OK"), res.stdout[-3000:]
