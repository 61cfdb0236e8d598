"""``python -m UniverSegResearch train``: train / fine-tune UniverSeg v1 on prepared slice stacks.

Also runnable on its own (``python -m UniverSegResearch.cli.train ...``), which imports nothing but
torch and numpy -- the form used on the GPU machine.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import List, Optional

from UniverSegLogic.errors import UniverSegError, one_line

HELP = "train or fine-tune the network on prepared .npz slice stacks (GPU recommended)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train flags (defaults come from :class:`train.TrainConfig`)."""
    from ..train import TrainConfig

    d = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("data", "out")}
    p.add_argument(
        "--data",
        required=True,
        help="folder with train/ and val/ sub-folders of <case>__<axis>.npz stacks",
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint, weights, log, plot)")
    p.add_argument(
        "--minutes",
        type=float,
        default=d["minutes"],
        help="wall-clock budget of the run, loading included (default %(default)s)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument(
        "--resume",
        default=None,
        help="full checkpoint (checkpoint.pt) or plain v1 state dict to start from",
    )
    p.add_argument("--device", default=d["device"], help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=d["seed"])
    g = p.add_argument_group("episodes")
    g.add_argument("--episodes", type=int, default=d["episodes"], help="episodes per step")
    g.add_argument("--targets", type=int, default=d["targets"], help="targets per episode")
    g.add_argument("--max-k", type=int, default=d["max_k"], help="labeled slices: 1..max-k")
    g.add_argument("--max-support", type=int, default=d["max_support"])
    g.add_argument(
        "--gap",
        type=int,
        default=d["gap"],
        help="targets reach at least this many slices beyond the structure",
    )
    g.add_argument("--p-cross", type=float, default=d["p_cross"])
    g.add_argument("--p-synthetic", type=float, default=d["p_synthetic"])
    g.add_argument("--synth-volumes", type=int, default=d["synth_volumes"])
    g.add_argument("--synth-depth", type=int, default=d["synth_depth"])
    g.add_argument("--no-augment", dest="augment", action="store_false")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=d["lr"])
    o.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    o.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    o.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA too")
    v = p.add_argument_group("validation and logging")
    v.add_argument("--val-structures", type=int, default=d["val_structures"])
    v.add_argument(
        "--val-max-targets",
        type=int,
        default=None,
        help="at most this many (evenly spaced) targets per validation episode",
    )
    v.add_argument("--val-every", type=int, default=None, help="validate every N steps")
    v.add_argument(
        "--val-every-s",
        type=float,
        default=d["val_every_s"],
        help="validate every this many seconds (default %(default)s)",
    )
    v.add_argument("--log-every-s", type=float, default=d["log_every_s"])
    v.add_argument("--checkpoint-every-s", type=float, default=d["checkpoint_every_s"])


def config_from_args(args: argparse.Namespace):
    """A :class:`train.TrainConfig` from parsed arguments."""
    from ..train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    from UniverSegLogic.core.io import check_output_path

    from ..train import train

    check_output_path(args.out, option="--out", folder=True)  # before loading any data
    cfg = config_from_args(args)
    if cfg.minutes <= 0 and not cfg.max_steps:
        print(
            "python -m UniverSegResearch train: error: --minutes must be positive", file=sys.stderr
        )
        return 2
    train(cfg, echo=lambda s: print(s, flush=True))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry point (does not load the other sub-commands)."""
    parser = argparse.ArgumentParser(prog="python -m UniverSegResearch train", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UniverSegError, OSError, ValueError) as exc:
        print(f"python -m UniverSegResearch train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
