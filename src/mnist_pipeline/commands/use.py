"""The commands that put the model to use: `mnist predict IMAGE...` and `mnist serve`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict

from mnist_pipeline.settings import PredictConfig, ServeConfig

Values = Dict[str, Any]


def predict(args: argparse.Namespace, v: Values) -> int:
    """One line per image on stdout, an `error: FILE: ...` line on stderr for each unreadable one."""
    from mnist_pipeline import predict as stage

    as_json = v.pop("json")  # how to print, not the stage's
    results = stage.run(PredictConfig(images=tuple(args.images), **v))
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
        elif not as_json:
            print(f"{result['file']}: {result['digit']} ({result['confidence']:.3f})")
    if as_json:
        print(json.dumps(results, indent=2))
    return 1 if any("error" in result for result in results) else 0


def serve(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline import serve as server

    server.run(ServeConfig(**v))  # granian handles SIGTERM itself: a graceful shutdown
    return 0


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
