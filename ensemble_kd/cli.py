"""The command line: `ensemble-kd run | clusters | export | predict | report`, and its one-line errors."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from .choices import EXPORT_FORMATS, STAGES
from .config import Config, load_config
from .errors import WRITE_ERRNOS, EnsembleKDError

EPILOG = "Run a command with --help for its options. Docs: README.md; run directory layout: artifacts/README.md."


RUN_DIR_HELP = "a run directory: the folder `ensemble-kd run --out` wrote (it holds config.toml)"


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        help="TOML config (see pipelines/configs/); default: the built-in defaults, made for digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set generalist.train.epochs=5 (repeatable)")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR",
                        help="the run directory to write (default: artifacts/<data.name>-seed<seed>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out with its own config.toml, reusing finished work")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in --out and start again (only a folder ensemble-kd made, holding "
                             "nothing but the files it writes)")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1],
                        help="stop after this stage (default: export, the last); e.g. clusters, to inspect "
                             "them before the specialists train")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines, warnings only")


def _command(commands: Any, name: str, summary: str, details: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the one-line `summary`, then `details`."""
    return commands.add_parser(name, help=summary, description=f"{summary}\n\n{details}", epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble-kd", epilog=EPILOG, description=(
        "Train a generalist, cluster the classes it confuses, train a specialist per cluster, combine them, "
        "and distil the ensemble into one compact exported student."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _command(commands, "run", "Run the pipeline: every stage, or up to --until a stage.",
                   "Stages: " + " -> ".join(STAGES) + ".\n"
                   "Writes everything into RUN_DIR (--out; default artifacts/<data.name>-seed<seed>) and\n"
                   "ends with a table of the models; finished work in RUN_DIR is reused with --resume.\n"
                   "Each stage folder gets metrics.csv (loss and accuracy per epoch; TensorBoard events too\n"
                   "with --set log.tensorboard=true), and report.md shows every stage's learning curves.\n"
                   "Settings: the built-in defaults (for the digits data), then --config, then each --set.")
    _add_run_arguments(run)
    clusters = _command(commands, "clusters", "Show a run's clusters of confusable classes.",
                        "Prints the table of clusters (or clusters.json with --json) of RUN_DIR and redraws\n"
                        "its heatmap, RUN_DIR/confusion.png. Needs a run that finished its clusters stage\n"
                        "(e.g. `ensemble-kd run --until clusters`).")
    clusters.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    clusters.add_argument("--json", action="store_true", help="print clusters.json instead of the table")
    export = _command(commands, "export", "Export a run's student again, in the formats you choose.",
                      "Writes the student of RUN_DIR (a run that finished its student stage) as each format,\n"
                      "each checked against eager PyTorch on the test set. Default formats: the run's own\n"
                      "export.formats (its config.toml; torchscript and state_dict unless changed).")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    export.add_argument("--format", help="comma-separated: " + ", ".join(EXPORT_FORMATS) + " (onnx needs the "
                                         "onnx extra); default: the run's export.formats")
    export.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/export)")
    predict = _command(commands, "predict", "Show an exported student's top classes for image files or .npy batches.",
                       "Images are read as in training (EXIF orientation, 16-bit scaled to 8 bits, alpha\n"
                       "dropped), then converted to the student's channels and resized to its input size\n"
                       "when they differ; one warning line says which files were changed. A .npy file holds\n"
                       "one example or a batch; uint8 arrays are scaled by 1/255, floats taken as [0, 1].")
    predict.add_argument("model", type=Path, help="an exported student file, its export folder, or a RUN_DIR "
                                                 "(its export folder is used)")
    predict.add_argument("files", type=Path, nargs="+", help="image files (PNG, JPEG, ...) or .npy batches")
    predict.add_argument("--top-k", type=int, default=3, help="how many classes to show per input (default: 3)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of lines")
    predict.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                         help="refuse images of more pixels than this (default: Pillow's limit against "
                              "decompression bombs, 178956970); raise it for huge images you trust")
    report = _command(commands, "report", "Print a run's table of models and rewrite its report.md.",
                      "Reads RUN_DIR/report.json (written when `ensemble-kd run` ends) and rewrites\n"
                      "report.md and accuracy_vs_size.png from it.")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    return parser


def _default_run_dir(cfg: Config) -> Path:
    return Path("artifacts") / f"{cfg.data.name}-seed{cfg.seed}"


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import preflight, run_pipeline, start_run
    from .report import format_table, verdict
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
        print("\n".join(verdict(report)))
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
    from .confusion import format_cluster_table, read_clusters_json
    from .report import write_heatmap

    clusters = read_clusters_json(args.run_dir)
    heatmap = write_heatmap(args.run_dir)
    print(json.dumps(clusters, indent=2) if args.json else format_cluster_table(clusters))
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
    from .export import InputError, load_student
    from .imagefolder import DEFAULT_MAX_IMAGE_PIXELS
    from .predict import iter_predictions, write_predictions

    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    max_pixels = DEFAULT_MAX_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels
    if max_pixels < 1:
        raise InputError(f"--max-image-pixels must be at least 1, got {max_pixels}")
    student = load_student(args.model)
    write_predictions(iter_predictions(student, args.files, args.top_k, max_pixels), sys.stdout, args.json)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import artifacts
    from .report import format_table, verdict, write_report

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
    print("\n".join(verdict(report)))
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
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise  # anything else is a bug: keep its traceback
        print(f"error: {_write_error(err)}", file=sys.stderr)
        return 2


def _write_error(err: OSError) -> str:
    """The one line for an OSError of WRITE_ERRNOS: the path, the system's reason, and what to do."""
    path = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:  # os.replace: the final name is the one the user knows
        path = err.filename2
    reason = err.strerror or str(err)
    fix = ("free some space, or choose another output folder (--out)" if err.errno in _FULL_ERRNOS else
           "make the folder writable, or choose another output folder (--out)")
    return _one_line(f"cannot write {path}: {reason}; {fix}")


_FULL_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))


if __name__ == "__main__":
    sys.exit(main())
