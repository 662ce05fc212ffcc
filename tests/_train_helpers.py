"""Shared helpers of the trainer/method tests: a resolved config and a small trainer on the built-in data."""

from engine.data import build_pretrain_loader, builtin_dataset
from engine.methods import build_method, get_method
from engine.trainer import Trainer, seed_everything
from engine.trainer.config import resolve
from engine.trainer.distributed import DistInfo


def make_cfg(tmp_path, **over):
    cli = dict(method="simmim", model="vit_femto", batch_size=16, max_steps=6, output_dir=str(tmp_path),
               num_threads=1, print_every=1000, final_knn=False, warmup_epochs=0.0)
    cli.update(over)
    return resolve(cli, method_defaults_fn=lambda m: get_method(m).defaults)


def make_trainer(cfg, dist=None, backend="torch"):
    dist = dist or DistInfo()
    seed_everything(cfg["seed"] + dist.rank)  # as engine.pretrain does
    method = build_method(cfg["method"], cfg)
    loader = build_pretrain_loader(cfg["method"], builtin_dataset(image_size=cfg["image_size"]),
                                   batch_size=cfg["batch_size"], image_size=cfg["image_size"], seed=cfg["seed"],
                                   shard_id=dist.rank, num_shards=dist.world_size, num_threads=cfg["num_threads"],
                                   backend=backend, **method.loader_kwargs())
    return Trainer(method, loader, cfg, dist)


def method_cfg(method, **over):
    """A resolved config of ``method`` at CPU-test size (vit_femto, 32 px, batch 8), without a final k-NN."""
    cli = dict(method=method, model="vit_femto", image_size=32, batch_size=8, final_knn=False)
    cli.update(over)
    return resolve(cli, method_defaults_fn=lambda m: get_method(m).defaults)


def fake_checkpoint(method, path):
    """What the trainer writes, minus optimiser/loader state (load_tokenizer reads config/method/model)."""
    import torch

    torch.save({"model": method.state_dict(), "method": method.name, "config": dict(method.cfg)}, path)
    return path


def random_images(b=6, s=32, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, s, s, generator=g)


def run_pretrain(*args, timeout=300):
    """``python -m engine.pretrain ARGS`` in a subprocess from the repository root (captured, not checked)."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([sys.executable, "-m", "engine.pretrain", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
