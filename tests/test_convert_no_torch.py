"""`moge convert` imports torch only where tensors are computed: casts yes, moving bytes no."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moge_cli.safetensors_format import read_header

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"

# Runs each `moge` command line in one fresh interpreter, then prints the exit codes and whether torch was imported.
RUN = """
import json, sys
from moge_cli.main import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def moge_lines(*argvs: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(argvs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_moving_bytes_never_imports_torch(tmp_path):
    src = str(FIXTURE)
    r = moge_lines(
        ["convert", src, str(tmp_path / "stacked"), "--layout", "stacked", "-q"],
        ["convert", str(tmp_path / "stacked"), str(tmp_path / "back"), "--layout", "per-expert", "--verify", "-q"],
        ["convert", src, str(tmp_path / "dry"), "--layout", "stacked", "--dry-run", "--json"],
        ["convert", src, str(tmp_path / "cut"), "--layers", "1", "--ep", "2", "--max-shard-size", "100KB", "--verify", "-q"],
    )
    assert r == {"codes": [0, 0, 0, 0], "torch": False}
    assert (tmp_path / "back" / "config.json").exists() and (tmp_path / "cut" / "ep_plan.json").exists()
    assert not (tmp_path / "dry").exists()


def test_a_cast_still_computes_with_torch(tmp_path):
    out = tmp_path / "f32"
    r = moge_lines(["convert", str(FIXTURE), str(out), "--dtype", "float32", "--verify", "-q"])
    assert r == {"codes": [0], "torch": True}
    dtypes = {info.dtype for f in out.glob("*.safetensors") for info in read_header(f)[0].values()}
    assert dtypes == {"F32"}
