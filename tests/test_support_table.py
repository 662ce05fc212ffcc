"""The README's support table equals the op declarations; `python -m kernels.info` runs and lists every op."""

import json
import pathlib
import re
import subprocess
import sys

import kernels  # noqa: F401  (registers every op)
from kernels import _backend, info

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
REGENERATE = "python -m kernels.info --markdown"


def readme_table() -> str:
    text = README.read_text()
    assert START in text and END in text, f"README.md lost the {START} / {END} markers"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_readme_support_table_matches_declarations():
    expected = info.render_markdown(info.support_table()).strip()
    assert readme_table() == expected, (
        f"README.md's support table is stale: replace the lines between the markers with the output of "
        f"`{REGENERATE}`"
    )


def test_every_registered_op_has_a_row():
    rows = [line for line in readme_table().splitlines() if line.startswith("| `")]
    names = [re.match(r"\| `([^`]+)`", r).group(1) for r in rows]
    assert sorted(names) == sorted(_backend.REGISTRY)


def test_info_command_runs_and_lists_every_op(capsys):
    out = subprocess.run([sys.executable, "-m", "kernels.info"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    for name in _backend.REGISTRY:
        assert f"`{name}`" in out.stdout, name
    assert "torch:" in out.stdout
    assert info.main(["--markdown"]) == 0
    assert capsys.readouterr().out.strip() == info.render_markdown(info.support_table()).strip()
    assert info.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in data["ops"]} == set(_backend.REGISTRY)


def test_readme_names_every_registered_custom_op():
    from kernels import library

    text = README.read_text()
    for public, names in library.OPS.items():
        assert f"kernels.{public}" in text or public in text, public
        for name in names:
            stem = name.rsplit("_", 1)[0] if name.endswith(("_fwd", "_bwd")) else name
            assert stem in text, f"README does not mention the registered op {name}"
