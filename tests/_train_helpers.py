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
