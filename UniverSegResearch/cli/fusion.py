"""``python -m UniverSegResearch fusion data|train|select``: the learned fusion, on the CPU.

* ``data``: training samples from the training volumes (:mod:`UniverSegResearch.fusion_data`;
  resumable, one file per case and axis) and the validation episodes of the calibration
  (:func:`UniverSegResearch.calibrate.build_episodes`, cached);
* ``train``: the fusion net on those samples (:mod:`UniverSegResearch.fusion_train`; one thread,
  seeded, resumable checkpoints);
* ``select``: score checkpoints (and the extent beyond the painted range) on the validation
  episodes with the real fusion code, write the chosen one (``Resources/starter_fusion_net.pt``).
"""

from __future__ import annotations

import glob
import os
import time

from UniverSegLogic.errors import UsageError

DEFAULT_ROOT = os.path.join(".data", "fusion")


def register(sub) -> None:
    p = sub.add_parser(
        "fusion",
        help="train the learned fusion on the CPU (data, train, select)",
        description="The learned fusion (UniverSegLogic/core/fusion_net.py): build its training "
        "samples from the training volumes, train it with one CPU thread, choose a checkpoint "
        "on the validation episodes.",
    )
    p.add_argument("step", choices=("data", "train", "select", "speed"))
    p.add_argument(
        "--weights",
        default="starter",
        help="network weights whose logits the fusion corrects: starter or a weights file "
        "(its logistic rule: the shipped one or the file's .fusion.json sidecar)",
    )
    p.add_argument("--root", default=DEFAULT_ROOT, help="working folder (default .data/fusion)")
    p.add_argument(
        "--cache",
        default=os.path.join(".data", "cache"),
        help="download cache of the training sources (default .data/cache)",
    )
    p.add_argument(
        "--sources",
        default=None,
        help="comma-separated training sources (default: "
        "totalsegmentator,nilearn,mricron_brodmann,itk_examples)",
    )
    p.add_argument(
        "--cases",
        default=None,
        metavar="MANIFEST",
        help="evaluation manifest: its validation cases give the validation episodes",
    )
    p.add_argument(
        "--samples",
        default=None,
        help="train: comma-separated sample folders (default: ROOT/samples)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-structure", type=int, default=3, help="data: episodes per structure")
    p.add_argument("--steps", type=int, default=6000, help="train: optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="train: samples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="train: peak learning rate")
    p.add_argument("--widths", default="12,24,48,96", help="train: U-Net widths per level")
    p.add_argument("--every", type=int, default=500, help="train: checkpoint every N steps")
    p.add_argument(
        "--dice-weight",
        type=float,
        default=1.0,
        help="train: weight of the soft-Dice term added to the cross-entropy (default 1)",
    )
    p.add_argument("--run", default="run", help="train/select: run name (folder under --root)")
    p.add_argument(
        "--out", default=None, help="select: learned-fusion file to write (default: none)"
    )
    p.add_argument(
        "--checkpoints",
        default=None,
        help="select: comma-separated checkpoint steps to score (default: every one)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--fusion-model",
        default="learned",
        help="speed: the learned fusion to time against the logistic rule (learned or a .pt)",
    )
    p.add_argument("--repeats", type=int, default=3, help="speed: timed runs of each (3)")
    p.add_argument(
        "--shape",
        default="200,256,256",
        help="speed: synthetic volume K,J,I (200,256,256), or clinical (the clinical benchmark's "
        "512x512x400 CT)",
    )
    p.add_argument("--json", default=None, help="speed/select: write the results here")
    p.set_defaults(func=run)


def _sources(args):
    from ..fusion_data import DEFAULT_SOURCES

    return [s for s in args.sources.split(",") if s] if args.sources else list(DEFAULT_SOURCES)


def run(args) -> int:
    import torch

    torch.set_num_threads(int(args.threads))
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.step == "data":
        return _data(args, log)
    if args.step == "speed":
        from .. import fusion_train

        if args.shape == "clinical":
            shape = "clinical"
        else:
            shape = tuple(int(v) for v in args.shape.split(","))
            if len(shape) != 3:
                raise UsageError("--shape needs K,J,I or clinical")
        fusion_train.speed(shape, args.fusion_model, args.repeats, args.weights, args.json, log)
        return 0
    if args.step == "train":
        from .. import fusion_train

        widths = [int(w) for w in args.widths.split(",") if w]
        folders = args.samples.split(",") if args.samples else [os.path.join(args.root, "samples")]
        paths = sorted(p for f in folders if f for p in glob.glob(os.path.join(f, "*.npz")))
        fusion_train.train(
            sample_dir=",".join(folders),
            sample_paths=paths,
            run_dir=os.path.join(args.root, args.run),
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            widths=widths,
            seed=args.seed,
            every=args.every,
            log=log,
            dice_weight=args.dice_weight,
        )
        return 0
    if not args.cases:
        raise UsageError("fusion select needs --cases (the evaluation manifest)")
    from .. import fusion_train

    steps = [int(s) for s in args.checkpoints.split(",") if s] if args.checkpoints else None
    report = fusion_train.select(
        os.path.join(args.root, args.run),
        args.cases,
        os.path.join(args.root, "val_episodes"),
        steps,
        args.out,
        log,
        args.weights,
    )
    if args.json:
        import json

        from UniverSegLogic.core.atomic import write_text

        write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0


def _data(args, log) -> int:
    from UniverSegLogic.core.engines import EngineStore

    from .. import fusion_data

    engine = EngineStore().get(args.weights, "cpu").engine
    t0 = time.perf_counter()
    if args.cases:
        from .. import fusion_train

        fusion_train.validation_episodes(
            args.cases, os.path.join(args.root, "val_episodes"), engine, log
        )
        log(f"validation episodes ready ({time.perf_counter() - t0:.0f} s)")
    cases = fusion_data.load_training_cases(args.cache, _sources(args))
    for c in cases:
        log(f"training case {c.name}: {len(c.masks)} structures ({c.licence})")
    paths = fusion_data.build_samples(
        cases,
        engine,
        os.path.join(args.root, "samples"),
        seed=args.seed,
        per_structure=args.per_structure,
        log=log,
        weights=args.weights,
    )
    log(f"{len(paths)} sample files in {time.perf_counter() - t0:.0f} s")
    return 0
