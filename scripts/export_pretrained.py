"""
Write a model to pretrained/ the way it ships: its weights in 16 bits (float16; loaded as
float32), the settings that made it, and a manifest.json beside it. scripts/make_pretrained.sh
calls it; nothing else writes to pretrained/.

    python scripts/export_pretrained.py --src=out-pretrained/target --dst=pretrained/arith-target \
        --made_by="python train.py"
    python scripts/export_pretrained.py --table=out-pretrained/bench.json   # the held-out table,
                                                                            # into both manifests
"""

import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from anywhere

import torch

from common import SHIPPED, load_checkpoint, run, save_checkpoint
from extras.configurator import configure

KEEP = ("model_args", "config", "dataset", "kind", "iter_num", "max_iters", "target", "val_loss", "curve",
        "tokenizer")


@dataclass
class ExportConfig:
    src: str = ""                 # a run's folder: its ckpt.pt is exported
    dst: str = ""                 # pretrained/<name>
    made_by: str = ""             # the commands that made it, the last one exactly as run:
                                  # tests/test_pretrained.py checks today's defaults against it
    table: str = ""               # a bench.py JSON of the shipped target and CLLM: into the manifests


def export(cfg):
    model, checkpoint = load_checkpoint(os.path.join(cfg.src, "ckpt.pt"))
    state = {k: checkpoint[k] for k in KEEP if k in checkpoint}
    # model.half() keeps the tied embedding and output weights one tensor, stored once
    state.update(model=model.half().state_dict())
    path = os.path.join(cfg.dst, "ckpt.pt")
    save_checkpoint(path, state)
    manifest = dict(name=os.path.basename(cfg.dst), kind=checkpoint.get("kind"), made_by=cfg.made_by,
                    remake="bash scripts/make_pretrained.sh", settings=checkpoint["config"],
                    model=checkpoint["model_args"], parameters=model.num_params(),
                    storage="float16, loaded as float32", bytes=os.path.getsize(path),
                    iteration=checkpoint.get("iter_num"), dataset=checkpoint["dataset"],
                    tokenizer_fingerprint=checkpoint["tokenizer"], prepare="python data/arith/prepare.py (defaults)",
                    torch=torch.__version__)
    _write_json(os.path.join(cfg.dst, "manifest.json"), manifest)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB) and its manifest.json")


def add_table(cfg):
    with open(cfg.table) as f:
        bench = json.load(f)
    for dst, name in ((SHIPPED["out-arith"], "target"), (SHIPPED["out-cllm-arith"], "CLLM")):
        path = os.path.join(dst, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["held_out"] = dict(command=f"python bench.py {' '.join(bench['argv'])}",
                                    environment=bench["environment"], rows=bench["results"][name])
        _write_json(path, manifest)
        print(f"added the held-out table to {path}")


def _write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv):
    cfg = configure(ExportConfig(), argv)
    add_table(cfg) if cfg.table else export(cfg)


if __name__ == "__main__":
    run(main)
