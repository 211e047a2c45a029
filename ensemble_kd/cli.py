"""`ensemble-kd run | clusters | export | predict | report`."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

from .config import Config, load_config
from .errors import EnsembleKDError

EPILOG = "Run a command with --help for its options. Docs: README.md; run directory layout: artifacts/README.md."


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from .pipeline import STAGES

    parser.add_argument("--config", type=Path, help="TOML config (see pipelines/configs/); defaults are for digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set generalist.train.epochs=5 (repeatable)")
    parser.add_argument("--out", type=Path, help="run directory (default artifacts/<data>-seed<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, reusing finished work")
    parser.add_argument("--overwrite", action="store_true", help="delete what --out holds and start again")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1],
                        help="stop after this stage (e.g. clusters, to inspect them before training specialists)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble-kd", epilog=EPILOG, description=(
        "Train a generalist, cluster the classes it confuses, train a specialist per cluster, combine them, "
        "and distil the ensemble into one compact exported student."))
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline (all stages, or --until a stage)")
    _add_run_arguments(run)
    clusters = commands.add_parser("clusters", help="show a run's clusters and write confusion.png")
    clusters.add_argument("run_dir", type=Path)
    clusters.add_argument("--json", action="store_true", help="print clusters.json instead of the table")
    export = commands.add_parser("export", help="export a run's student")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", help="comma-separated: torchscript, export, onnx (needs the onnx extra), "
                                         "state_dict; default: the run's export.formats")
    export.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
    predict = commands.add_parser("predict", help="top-k classes of image files or a .npy batch")
    predict.add_argument("model", type=Path, help="an exported student file, or an export folder")
    predict.add_argument("files", type=Path, nargs="+", help="image files (PNG, JPEG, ...) or .npy batches")
    predict.add_argument("--top-k", type=int, default=3, help="how many classes to show per input")
    predict.add_argument("--json", action="store_true", help="print JSON instead of lines")
    report = commands.add_parser("report", help="print a run's report table (and rewrite report.md)")
    report.add_argument("run_dir", type=Path)
    return parser


def _default_run_dir(cfg: Config) -> Path:
    return Path("artifacts") / f"{cfg.data.name}-seed{cfg.seed}"


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import preflight, run_pipeline, start_run
    from .report import format_table
    from .resume import resume_config

    if args.resume and not args.overwrite:  # the run's own settings, changed only where that is safe
        out = args.out or _default_run_dir(load_config(args.config, args.overrides))
        cfg = resume_config(out, args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        out = args.out or _default_run_dir(cfg)
    preflight(cfg, args.until)
    run_dir = start_run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    logging.getLogger(__name__).info("run directory: %s", run_dir)
    report = run_pipeline(cfg, run_dir, until=args.until, progress=not args.quiet)
    if "ensemble" in report:
        print(format_table(report))
    if args.until == "clusters":
        cmd_clusters(argparse.Namespace(run_dir=run_dir, json=False))
        print(f"\nInspect the clusters, then continue with: ensemble-kd run --out {run_dir} --resume "
              "[--set clusters.k=...]")
    exports = report.get("exports", {}).get("formats", {})
    if exports:
        print("\nexported student:")
        for fmt, entry in exports.items():
            print(f"  {fmt:12s} {entry['path']}")
    print(f"\nreport: {run_dir / 'report.md'}")
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    from .confusion import show_clusters

    text, heatmap = show_clusters(args.run_dir, as_json=args.json)
    print(text)
    if not args.json:
        print(f"\nheatmap: {heatmap}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_from_run_dir

    formats = None if args.format is None else [f.strip() for f in args.format.split(",") if f.strip()]
    result = export_from_run_dir(args.run_dir, formats, args.out)
    for fmt, entry in result["formats"].items():
        print(f"{fmt:12s} {entry['path']}  ({entry['bytes']:,} bytes, max |diff| vs eager {entry['max_abs_diff']:.2e})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .export import InputError
    from .predict import format_predictions, predict_files

    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    results = predict_files(args.model, args.files, top_k=args.top_k)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import artifacts
    from .report import format_table, write_report

    run_dir = artifacts.require_run_dir(args.run_dir)
    path = run_dir / artifacts.REPORT_JSON
    if not path.is_file():
        finished = list(artifacts.finished_stages(run_dir))
        raise artifacts.ArtifactError(
            f"{run_dir} has no report yet: {artifacts.REPORT_JSON} is written when `ensemble-kd run` ends, after its "
            f"last stage (export, or the stage --until names; finished so far: {', '.join(finished) or 'none'}); "
            f"finish the run with: ensemble-kd run --out {run_dir} --resume")
    report = artifacts.read_json(path)
    write_report(run_dir, report)
    print(format_table(report))
    return 0


COMMANDS = {"run": cmd_run, "clusters": cmd_clusters, "export": cmd_export, "predict": cmd_predict,
            "report": cmd_report}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the work in progress stops, finished work is kept."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_like_ctrl_c() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while a command runs (signal handlers need the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        with _sigterm_like_ctrl_c():
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a reader that went away (`| head`) shows up here, not at exit
            return code
    except KeyboardInterrupt as err:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        print(f"\n{what}; finished work is saved: rerun with --resume to continue", file=sys.stderr)
        return code
    except BrokenPipeError:  # e.g. `ensemble-kd clusters RUN --json | head`: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return 128 + signal.SIGPIPE
    except EnsembleKDError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
