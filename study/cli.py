"""The ``capdec-study`` command line: prepare, run, resume, report, evaluate, ui, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("capdec_study")

# flags of `run` that override top-level settings, with their settings key
_RUN_FLAGS = {
    "data": "data",
    "clip": "clip",
    "space": "space",
    "trials": "trials",
    "epochs": "epochs",
    "decoder": "decoder",
    "name": "name",
    "storage": "storage",
    "seed": "seed",
    "cpus_per_trial": "cpus_per_trial",
    "gpus_per_trial": "gpus_per_trial",
    "max_concurrent": "max_concurrent",
    "scheduler": "scheduler",
    "grace_period": "grace_period",
    "reduction_factor": "reduction_factor",
    "max_failures": "max_failures",
    "tracking_uri": "tracking_uri",
    "ray_address": "ray_address",
}


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once: time, level, logger name, message."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------- parsers


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="encode a Karpathy-split dataset with CLIP into a prepared-dataset folder",
        description="Encode captions with the CLIP text encoder and photos with the CLIP image "
        "encoder, once, into a folder that every trial and study reuses.",
    )
    parser.add_argument("--karpathy-json", required=True, type=Path,
                        help="Karpathy-split annotations (dataset_coco.json layout)")
    parser.add_argument("--images-root", required=True, type=Path,
                        help="folder that the JSON's filepath/filename entries are relative to")
    parser.add_argument("--text-corpus", type=Path, default=None,
                        help="optional text-only training captions: JSON lines with a 'caption' "
                        "field, or plain text with one caption per line")
    parser.add_argument("--clip", default="ViT-B-32",
                        help="open_clip model name, or 'tiny' for a small random-initialised CLIP "
                        "for smoke runs (default: ViT-B-32)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip pretrained tag (default: openai) or a local checkpoint "
                        "file; 'none' for random weights")
    parser.add_argument("--out", required=True, type=Path, help="prepared-dataset folder to write")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                        help="torch device for encoding (default: cuda when available, else cpu)")
    parser.add_argument("--text-batch-size", type=int, default=256,
                        help="captions encoded per batch (default: 256)")
    parser.add_argument("--image-batch-size", type=int, default=64,
                        help="images encoded per batch (default: 64)")
    parser.add_argument("--max-corpus-captions", type=int, default=None,
                        help="encode only a seeded random subset of this many corpus captions")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the corpus subset and of a random-initialised CLIP")
    parser.add_argument("--no-restval", action="store_true",
                        help="drop the Karpathy 'restval' photos instead of adding them to train")


def _add_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a new hyperparameter study",
        description="Run a new study: Optuna proposes trials, ASHA stops weak ones early on "
        "validation CIDEr, and MLflow logs every trial. The study folder is STORAGE/NAME.",
        epilog=_spaces_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("settings", nargs="?", type=Path, default=None,
                        help="YAML settings file; flags override its values")
    parser.add_argument("--data", help="prepared-dataset folder (from `prepare` or `demo`)")
    parser.add_argument("--clip", help="CLIP model the prepared data must be encoded with, "
                        "e.g. ViT-B-32; a mismatch is an error (default: accept any)")
    parser.add_argument("--space", help="search space name, or package.module:function "
                        "(default: epsilon; see the list below)")
    parser.add_argument("--trials", type=int, help="number of trials (default: 8)")
    parser.add_argument("--epochs", type=int, help="maximum epochs per trial (default: 3)")
    parser.add_argument("--decoder", help="'tiny' (random-initialised small GPT-2), a "
                        "transformers model name such as gpt2, or a folder saved with "
                        "save_pretrained (default: tiny)")
    parser.add_argument("--name", help="study name: the study folder and the MLflow experiment")
    parser.add_argument("--storage", help="folder in which the study folder is created "
                        "(default: ./studies)")
    parser.add_argument("--seed", type=int, help="seed of the sampler and of training (default: 0)")
    parser.add_argument("--cpus-per-trial", type=float, help="CPU cores per trial (default: 1)")
    parser.add_argument("--gpus-per-trial", type=float,
                        help="GPUs per trial; a fraction shares a GPU (default: 0)")
    parser.add_argument("--max-concurrent", type=int,
                        help="trials running at once; 0 = as resources allow (default: 0)")
    parser.add_argument("--scheduler", choices=("asha", "fifo"),
                        help="asha stops weak trials early; fifo runs every trial to the end")
    parser.add_argument("--grace-period", type=int,
                        help="epochs before ASHA may stop a trial (default: 1)")
    parser.add_argument("--reduction-factor", type=float,
                        help="ASHA keeps the best 1/N of trials at each rung (default: 3)")
    parser.add_argument("--max-failures", type=int,
                        help="retries of a trial whose worker died (default: 2)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                        "else sqlite database mlflow.db in the study folder)")
    parser.add_argument("--ray-address", help="address of a running Ray cluster "
                        "(default: start a local one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a run-configuration value for every trial, e.g. "
                        "--set batch_size=32; repeatable")


def _add_study_dir_command(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("study_dir", type=Path, help="study folder (STORAGE/NAME)")
    return parser


def _int_at_least(minimum: int, maximum: int | None = None):
    """Return an argparse type that reads an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}; got {value}")
        return value

    return parse


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the embedded demo: a synthetic world, a self-trained tiny CLIP and an "
        "epsilon study",
        description="Generate a synthetic captioning world and train a tiny CLIP on it (both "
        "cached), then run an epsilon study with Optuna, ASHA and MLflow and print its report. "
        "Needs no network and no pretrained weights.",
    )
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the world, the CLIP and the study (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller world and study, sized for tests (a few minutes)")
    parser.add_argument("--storage", type=Path, default=Path("capdec-demo"),
                        help="folder for the prepared data and the study (default: ./capdec-demo)")
    parser.add_argument("--trials", type=_int_at_least(1), default=None,
                        help="number of trials (default: 8, or 4 with --quick)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capdec-study",
        description="Hyperparameter studies of CapDec noise injection for text-only captioning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prepare(subparsers)
    _add_run(subparsers)
    _add_study_dir_command(subparsers, "resume", "continue an interrupted study")
    report = _add_study_dir_command(
        subparsers, "report", "print the trials of a study, best validation CIDEr first"
    )
    report.add_argument("--plot", type=Path, default=None,
                        help="also write a PNG of validation CIDEr per epoch for every trial")
    evaluate = _add_study_dir_command(
        subparsers,
        "evaluate",
        "score the best trials' best-epoch weights on a held-out split with all seven metrics",
    )
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="split to decode and score (default: test)")
    evaluate.add_argument("--top", type=int, default=3,
                          help="number of trials, best validation CIDEr first (default: 3)")
    evaluate.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                          help="torch device for decoding (default: cuda when available)")
    ui = _add_study_dir_command(
        subparsers, "ui", "serve the study's MLflow runs in a browser (mlflow ui)"
    )
    ui.add_argument("--host", default="127.0.0.1",
                    help="interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 "
                    "exposes the runs to the network)")
    ui.add_argument("--port", type=_int_at_least(1, 65535), default=5000,
                    help="TCP port (default: 5000)")
    _add_demo(subparsers)
    return parser


def _spaces_epilog() -> str:
    from search_spaces import describe_spaces

    return "search spaces:\n" + "\n".join(f"  {line}" for line in describe_spaces().splitlines())


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# --------------------------------------------------------------- commands


def parse_set_values(pairs: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are read as YAML scalars (numbers, booleans, text).

    Raises:
        ValueError: on an item without '='.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE; got {pair!r}")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def resolve_run_settings(args: argparse.Namespace):
    """Merge the settings file and the flags into validated ``StudySettings``."""
    from study.settings import StudySettings, read_settings_file

    values: dict[str, Any] = read_settings_file(args.settings) if args.settings else {}
    source = str(args.settings) if args.settings else "settings"
    for flag, key in _RUN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            values[key] = value
    fixed = parse_set_values(args.set)
    if fixed:
        values["run"] = {**values.get("run", {}), **fixed}
    return StudySettings.from_dict(values, source=source)


def cmd_prepare(args: argparse.Namespace) -> int:
    from capdec.prepare import prepare_dataset

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    if args.clip == "tiny" and pretrained == "openai":
        # the default tag does not exist for the tiny model; a checkpoint file still loads
        pretrained = None
    out = prepare_dataset(
        karpathy_json=args.karpathy_json,
        images_root=args.images_root,
        out=args.out,
        text_corpus=args.text_corpus,
        clip_model=args.clip,
        clip_pretrained=pretrained,
        device=args.device,
        text_batch_size=args.text_batch_size,
        image_batch_size=args.image_batch_size,
        restval_as_train=not args.no_restval,
        max_corpus_captions=args.max_corpus_captions,
        seed=args.seed,
    )
    print(f"prepared dataset written to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from study.runner import print_outcome, run_study

    settings = resolve_run_settings(args)
    outcome = run_study(settings)
    _print_report(outcome.study_dir)
    print_outcome(outcome)
    return 0 if not outcome.interrupted else 130


def cmd_resume(args: argparse.Namespace) -> int:
    from study.runner import print_outcome, resume_study

    outcome = resume_study(args.study_dir)
    _print_report(outcome.study_dir)
    print_outcome(outcome)
    return 0 if not outcome.interrupted else 130


def cmd_report(args: argparse.Namespace) -> int:
    _print_report(args.study_dir, plot=args.plot)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from study.demo import describe_world_clip, run_demo
    from study.settings import load_study_settings

    outcome = run_demo(seed=args.seed, quick=args.quick, storage=args.storage, trials=args.trials)
    _print_report(outcome.study_dir)
    print(describe_world_clip(load_study_settings(outcome.study_dir).data))
    from study.runner import print_outcome

    print_outcome(outcome)
    return 0 if not outcome.interrupted else 130


def cmd_evaluate(args: argparse.Namespace) -> int:
    from study.evaluate import evaluate_study, format_evaluations

    evaluations = evaluate_study(args.study_dir, split=args.split, top=args.top, device=args.device)
    print(f"\n{args.split} scores of the {len(evaluations)} best trials by validation CIDEr\n")
    print(format_evaluations(evaluations))
    return 0


def mlflow_ui_command(study_dir: Path, *, host: str, port: int) -> list[str]:
    """Return the `mlflow ui` command line that serves a study's tracking store.

    Raises:
        ValueError: when the study logs to a tracking server rather than a database file.
    """
    from study.runner import tracking_uri_of
    from study.settings import load_study_settings

    study_dir = Path(study_dir).resolve()
    uri = tracking_uri_of(load_study_settings(study_dir), study_dir)
    if uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(f"study {study_dir} logs to the tracking server {uri}; open that instead")
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--default-artifact-root", str(study_dir / "mlartifacts"),
        "--host", host,
        "--port", str(port),
    ]


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    command = mlflow_ui_command(args.study_dir, host=args.host, port=args.port)
    print(f"MLflow UI at http://{args.host}:{args.port} (Ctrl-C stops it)")
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def _print_report(study_dir: Path, plot: Path | None = None) -> None:
    from analysis.report import format_report, load_trials

    trials = load_trials(study_dir)
    print(f"\nStudy {study_dir}: {len(trials)} trials, best validation CIDEr first\n")
    print(format_report(trials))
    if plot is not None:
        from analysis.plots import plot_cider_curves

        plot_cider_curves(trials, plot)
        print(f"\nplot written to {plot}")


_COMMANDS = {
    "prepare": cmd_prepare,
    "run": cmd_run,
    "resume": cmd_resume,
    "report": cmd_report,
    "demo": cmd_demo,
    "evaluate": cmd_evaluate,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from study.runner import StudyError

    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, StudyError) as error:
        # OSError covers files and folders that are missing, exist already or cannot be written
        logger.debug("command failed", exc_info=True)
        print(f"capdec-study {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside a study, for instance while the demo builds its world. A study catches
        # its own Ctrl-C and prints how to resume it.
        print(f"capdec-study {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
