"""Runs the python examples of README.md's "Using the kernels in your code" section (CPU, small shapes).

The timm example is marked ``timm`` (it needs the real timm: ``.ci/compat.sh`` runs it in its venv)."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the kernels in your code"


def section_blocks():
    text = README.read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)


BLOCKS = section_blocks()


def test_section_has_an_example_per_level():
    joined = "\n".join(BLOCKS)
    assert len(BLOCKS) >= 5
    for needle in ("kernels.attention(", "kernels.masked_cross_entropy(", "kernels.nearest_code(",
                   "kernels.sparse_conv2d(", "torch.compile(", "kernels.MultiheadSelfAttention(",
                   "kernels.VectorQuantizer(", "kernels.to_sparse(", "kernels.patch_timm("):
        assert needle in joined, f"no README example uses {needle}"


def _needs_timm(code):
    return re.search(r"^import timm", code, flags=re.MULTILINE) is not None


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.timm) if _needs_timm(code) else i
                                   for i, code in enumerate(BLOCKS)])
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if _needs_timm(code):  # marked timm: .ci/compat.sh runs it in its venv
        pytest.importorskip("timm")
    torch._dynamo.reset()
    try:
        program = compile(code, f"README.md example {index}", "exec")
        exec(program, {"__name__": f"readme_example_{index}"})  # noqa: S102  (running the README's examples)
    finally:
        torch._dynamo.reset()
