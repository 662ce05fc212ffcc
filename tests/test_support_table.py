"""The README's support table equals the op declarations; `python -m kernels.info` runs and lists every op."""

import json
import pathlib
import re
import subprocess
import sys

import torch

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


def test_triton_launchers_run_on_the_device_of_their_inputs(monkeypatch):
    """Triton launches on the *current* CUDA device: every launcher switches to its inputs' device first."""
    import contextlib

    from kernels import _backend

    entered = []

    @contextlib.contextmanager
    def fake_device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class OnCuda1(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    seen = []
    launch = _backend.launches_on_input_device(lambda *a, **k: seen.append((a, k)) or "ran")
    cuda_t = torch.Tensor._make_subclass(OnCuda1, torch.zeros(2))
    assert launch(3, cuda_t, torch.zeros(1), flag=True) == "ran" and entered == [torch.device("cuda", 1)]
    entered.clear()
    assert launch(torch.zeros(1), x=cuda_t) == "ran" and entered == []  # the first tensor decides: CPU
    assert launch(block=4) == "ran" and entered == [] and len(seen) == 3


def test_every_triton_launcher_is_device_guarded():
    """Each public launcher that launches a kernel (``kernel[grid](...)``) carries the device guard."""
    import importlib
    import inspect

    modules = ["kernels.masked.masked_token_scatter_triton", "kernels.masked.gather_masked_triton",
               "kernels.masked.masked_cross_entropy_triton",
               "kernels.attn.attention_triton", "kernels.attn.window_attention_triton",
               "kernels.codebook.nearest_code_triton", "kernels.codebook.ema_codebook_update_triton",
               "kernels.sparse_conv.sparse_conv2d_triton", "kernels.sparse_conv.masked_batch_norm_triton"]
    checked = 0
    for module in modules:
        mod = importlib.import_module(module)
        funcs = {n: f for n, f in vars(mod).items() if inspect.isfunction(f) and f.__module__ == module}
        source = {n: inspect.getsource(inspect.unwrap(f)) for n, f in funcs.items()}
        private_launchers = [n for n in funcs if n.startswith("_") and re.search(r"\]\(", source[n])]
        for name, fn in funcs.items():
            if name.startswith("_"):
                continue
            body = source[name]
            if re.search(r"\]\(", body) or any(f"{p}(" in body for p in private_launchers):
                assert hasattr(fn, "__wrapped__"), f"{module}.{name} launches Triton without the device guard"
                checked += 1
    assert checked >= 16
