"""The ``certify`` command.

``certify [options]`` certifies a model over a dataset (the run itself is in
``certify/jobs.py``); ``certify report ...`` and ``certify merge ...`` are subcommands.
argparse cannot give a command both options of its own and optional subcommands cleanly,
so :func:`main` dispatches on the first argument: a subcommand's name selects that
subcommand's parser, anything else is parsed as a certification run.

Every bad argument ends in one line on stderr, ``certify: error: <problem and fix>``, and
exit status 2 (usage) or 1 (any other ancer error); no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ancer.engine import OPTIMIZER_DEFAULTS, CertifyConfig
from ancer.errors import AncerError, ArgumentError
from ancer.models import DATASET_STATS, available_models
from ancer.vocabulary import COMPILE_CHOICES, DEFAULT_RADII_IN_SIGMAS, METHODS, NORMS, PRECISIONS, THETA0
from ancer.memory import Memory
from ancer.runs import GROUP_SAMPLES
from ancer import merge, results
from certify import demo, distributed, jobs, report
from certify.arguments import Parser, _device, _int, _positive_float, _positive_int, _probability, _radii, _shard

PROG = "certify"
#: the defaults of a run: the engine's config's
DEFAULTS = {f.name: f.default for f in dataclasses.fields(CertifyConfig)
            if f.default is not dataclasses.MISSING}
#: the engine's config fields, each the ``dest`` of its flag
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CertifyConfig))
EXIT_ERROR = 1
EXIT_USAGE = 2
#: the shell's status for a process ended by SIGINT (128 + 2)
EXIT_INTERRUPTED = 130


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``certify [options]``: a certification run."""
    parser = Parser(
        prog=PROG,
        description="Certify a classifier's robustness by randomized smoothing over a test "
                    "set, one TSV row per input (Cohen et al. 2019; Yang et al. 2020; ANCER, "
                    "Eiras et al. 2022). Rerunning the same command resumes the run.",
        epilog="subcommands: 'certify report RESULTS.tsv ...' (certified-accuracy curves), "
               "'certify merge --out RESULTS.tsv' (join shard files), "
               "'certify train ...' (train a base classifier), "
               "'certify train-denoiser ...' (train a denoiser for --denoiser). "
               "Example: certify --model ckpt.pth.tar --sigma 0.25 --data cifar-10-batches-py "
               "--out results.tsv (without --data a CIFAR-10 model certifies the shipped test "
               "images); certify --demo runs the shipped model.",
    )
    what = parser.add_argument_group("what to certify")
    what.add_argument("--model", metavar="CKPT",
                      help="base classifier checkpoint (.pt, .pth.tar; Cohen et al.'s "
                           "checkpoints are read as they are)")
    what.add_argument("--arch", choices=available_models(), metavar="NAME",
                      help="the checkpoint's architecture, for files that do not name it (bare "
                           "state dicts, DDRS/ANCER and MACER checkpoints): "
                           + ", ".join(available_models()))
    what.add_argument("--trust", action="store_true",
                      help="unpickle Python objects (a whole pickled nn.Module): only for files "
                           "from a trusted source, as unpickling can run code (default off: "
                           "tensors only)")
    what.add_argument("--norm-stats", choices=sorted(DATASET_STATS), metavar="NAME",
                      help="the normalization to restore in front of the network (and the input "
                           "size to probe a TorchScript or pickled model with): "
                           f"{', '.join(sorted(DATASET_STATS))} (default: the architecture's)")
    what.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                      help="restore the normalization layer in front of a state dict's network "
                           "(default: yes, except for MACER checkpoints, trained on raw inputs)")
    what.add_argument("--denoiser", metavar="PATH",
                      help="denoised smoothing: certify model(denoiser(x)); a DnCNN/MemNet "
                           "checkpoint (Salman et al.'s or 'certify train-denoiser'), a diffusers "
                           "UNet folder (one-shot diffusion, needs the [diffusion] extra) or "
                           "TorchScript (default: none)")
    what.add_argument("--dataset", choices=("cifar10", "imagenet", "folder", "npz"),
                      help="dataset kind (default: the one the checkpoint names)")
    what.add_argument("--data", metavar="DIR",
                      help="where the dataset lies on disk (default, for a CIFAR-10 model: the "
                           "100 CIFAR-10 test images shipped with ancer)")
    what.add_argument("--synsets", metavar="FILE",
                      help="ImageNet: the list of all 1000 synsets in label order (default: "
                           "synsets.txt or LOC_synset_mapping.txt in or beside --data; needed "
                           "when the folder holds fewer than 1000 classes)")
    what.add_argument("--labels-sorted", action="store_true",
                      help="--dataset folder: the class folders in sorted order are the model's "
                           "labels 0, 1, ... (default off: each folder is labelled by its name "
                           "among the model's classes, CIFAR-10's names or ImageNet's synsets, "
                           "and other names are refused)")
    what.add_argument("--skip", type=_positive_int, default=1, metavar="K",
                      help="certify every K-th input (Cohen et al. use 20 on CIFAR-10; default 1)")
    what.add_argument("--max", type=_positive_int, metavar="N",
                      help="stop before dataset index N, as Cohen et al.'s certify.py does: "
                           "with --skip K that is about N/K inputs (default: all)")
    what.add_argument("--any-classes", action="store_true",
                      help="certify even if the model's number of classes differs from the "
                           "dataset's (say so only if the labels are the model's class indices)")
    what.add_argument("--demo", action="store_true",
                      help="certify the small model and images shipped in the package, then report")

    noise = parser.add_argument_group("smoothing")
    noise.add_argument("--sigma", type=_positive_float, metavar="S",
                       help="noise standard deviation (uniform noise: half-width sqrt(3)*S); "
                            "required unless the checkpoint records the sigma it was trained "
                            "with (then that one is used, and the run says so)")
    noise.add_argument("--norm", choices=NORMS, default=DEFAULTS["norm"],
                       help="threat model: l2 (Gaussian noise) or l1 (uniform noise); "
                            "default %(default)s")
    noise.add_argument("--method", choices=METHODS, default=DEFAULTS["method"],
                       help="fixed isotropic noise, data-dependent isotropic sigma (dds), or "
                            "per-input anisotropic scales (ancer); default %(default)s")
    noise.add_argument("--n0", type=_positive_int, default=DEFAULTS["n0"],
                       help="noise samples to select the class (default %(default)s)")
    noise.add_argument("--n", "--num-samples", type=_positive_int, default=DEFAULTS["n"], dest="n",
                       help="noise samples to bound its probability (default %(default)s); under "
                            "torchrun write --num-samples, as torchrun reads --n as its own")
    noise.add_argument("--alpha", type=_probability, default=DEFAULTS["alpha"],
                       help="failure probability of each certificate (default %(default)s)")
    noise.add_argument("--sequential", action="store_true",
                       help="sequential CERTIFY: draw the n samples in growing rounds and stop "
                            "each input once its certified level on the --radii grid is "
                            "decided; each radius is tested at the full alpha by an exact "
                            "group-sequential test at looks fixed in advance, so the guarantee "
                            "is the same whatever the stopping, at a fraction of the samples; "
                            "the certified radius is the grid radius passed")
    noise.add_argument("--radii", type=_radii, metavar="R1,R2,...",
                       help="--sequential: the increasing radii whose certification decides "
                            "when an input stops (default: "
                            f"{', '.join(f'{k}*sigma' if k != 1 else 'sigma' for k in DEFAULT_RADII_IN_SIGMAS)})")

    optimizer = parser.add_argument_group("scale optimizer (--method dds or ancer)")
    ancer, dds = OPTIMIZER_DEFAULTS["ancer"], OPTIMIZER_DEFAULTS["dds"]
    optimizer.add_argument("--opt-iterations", type=_positive_int, metavar="T",
                           help="optimizer steps per input (default: the method's, "
                                f"{ancer['iterations']} for ancer, {dds['iterations']} for dds)")
    optimizer.add_argument("--opt-lr", type=_positive_float, metavar="LR",
                           help=f"optimizer learning rate (default: the method's, {ancer['lr']:g} "
                                f"for ancer, {dds['lr']:g} for dds), in the units the authors' "
                                "optimizers move: σ for l2, the uniform half-width λ = √3σ for l1")
    optimizer.add_argument("--opt-samples", type=_positive_int, metavar="M",
                           help="noise samples per optimizer step (default: the method's, "
                                f"{ancer['samples']} for ancer, {dds['samples']} for dds)")
    optimizer.add_argument("--theta0", choices=THETA0, default=DEFAULTS["theta0"],
                           help="ancer: start from the fixed --sigma or from a data-dependent "
                                "sigma (DDRS, default options); default %(default)s")
    optimizer.add_argument("--kappa", type=_positive_float, metavar="K",
                           help=f"ancer: weight of the proxy-radius term (default {ancer['kappa']:g})")

    compute = parser.add_argument_group("computation")
    compute.add_argument("--batch", type=_positive_int, default=DEFAULTS["batch"],
                         help="forward batch size, noise samples per model call (default "
                              "%(default)s)")
    compute.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                         help="evaluate the model in this precision (CERTIFY, and the dds/ancer "
                              "scale search); the certificate is about the model as evaluated "
                              "(default %(default)s)")
    compute.add_argument("--compile", choices=COMPILE_CHOICES, default=DEFAULTS["compile"],
                         help="torch.compile the model: auto = on CUDA, and on a CPU when the run "
                              "plans enough forward passes to repay compiling; a model that "
                              "fails to compile runs eagerly, with a warning (default %(default)s)")
    compute.add_argument("--cuda-graphs", action="store_true",
                         help="CUDA: replay each full forward batch from a recorded CUDA "
                              "graph (less launch overhead; ignored, with a warning, on the CPU)")
    compute.add_argument("--device", type=_device,
                         help="cpu, cuda or cuda:N (default: cuda if available)")
    compute.add_argument("--seed", type=_int, default=DEFAULTS["seed"],
                         help="random seed; each input's noise derives from (seed, idx), so "
                              "a row does not depend on shard or resume (default %(default)s)")
    compute.add_argument("--inputs-per-batch", type=_positive_int, metavar="B",
                         help="inputs certified together, their samples sharing forward "
                              "batches, their rows written together (default: batch // n0, "
                              "fewer when their n0 + n draws exceed "
                              f"{GROUP_SAMPLES:,}, so that rows land every few minutes; "
                              "at least 1)")
    compute.add_argument("--shard", type=_shard, metavar="I/K",
                         help="certify only shard I of K (0-based), written to "
                              "<out>.shardIofK.tsv; merge with 'certify merge' (for dds and "
                              "ancer the shards hold raw certificates, which the merge runs "
                              "through the memory)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default="results.tsv", metavar="TSV",
                        help="results file, resumed if it exists (default results.tsv); "
                             "settings go to its .json sidecar")
    output.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    output.add_argument("--progress-every", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="when stderr is not a terminal (nohup, a batch job, 2>log): a plain "
                             "progress line every SECONDS (default %(default)g)")
    return parser


def report_parser() -> argparse.ArgumentParser:
    """The parser of ``certify report``."""
    parser = Parser(
        prog=f"{PROG} report",
        description="Certified accuracy against radius (Cohen et al. 2019), clean accuracy, "
                    "abstain rate, average certified radius, mean log-volume and forward "
                    "passes of one or more results files, side by side. Reads Cohen et al.'s "
                    "files too.",
    )
    parser.add_argument("results", nargs="+", metavar="RESULTS.tsv", help="results files")
    parser.add_argument("--radii", default=report.DEFAULT_RADII, metavar="SPEC",
                        help="radii of the table's rows, as start:stop:step (stop included) "
                             f"or a list like 0,0.5,1 (default {report.DEFAULT_RADII})")
    parser.add_argument("--format", choices=report.FORMATS, default="md",
                        help="Markdown table, CSV, or a LaTeX tabular as papers print it "
                             "(booktabs; certified accuracy at --radii and ACR, one column per "
                             "run, the best in bold) on stdout (default md)")
    parser.add_argument("--label", action="append", metavar="NAME",
                        help="the name of a run in the table and the legend, once per results "
                             "file in their order (default: the file names)")
    parser.add_argument("--title", metavar="TEXT",
                        help="a title over the table (md), its caption (latex) and the plot")
    parser.add_argument("--per-class", action="store_true",
                        help="also certified accuracy per true label: a table per run (md, "
                             "latex), or rows certified_accuracy_class_<label> (csv)")
    parser.add_argument("--plot", metavar="PNG",
                        help="also save the curves as an image, one panel per norm, creating "
                             "its folder (needs matplotlib; default: no image)")
    return parser


def merge_parser() -> argparse.ArgumentParser:
    """The parser of ``certify merge``."""
    parser = Parser(
        prog=f"{PROG} merge",
        description="Merge results files (shards of one run) into one file ordered by idx, "
                    "each input once. Without files, merges <out>.shard<i>of<k>.tsv. Shards of "
                    "a --method dds or ancer run are answered here by the memory, in one "
                    "pass over all inputs in idx order, which re-reads the run's dataset.",
    )
    parser.add_argument("files", nargs="*", metavar="SHARD.tsv",
                        help="files to merge (default: the shards of --out)")
    parser.add_argument("--out", required=True, metavar="TSV", help="merged results file")
    parser.add_argument("--data", metavar="DIR",
                        help="dds/ancer shards: where the run's dataset lies now, if it moved "
                             "(default: the path in the shards' settings)")
    return parser


def _report(args: argparse.Namespace) -> int:
    """``certify report``: the table on stdout (and with --plot the image), and a warning
    for each setting in which runs of one norm differ."""
    radii = report.parse_radii(args.radii)
    names = _run_labels(args.label, args.results)
    tables = [results.read_results(path) for path in args.results]
    _warn_dropped((t.path, t.partial_line) for t in tables if t.partial_line is not None)
    summaries = [report.summarize(t, radii, name) for t, name in zip(tables, names)]
    _warn_raw(summaries)
    runs = list(zip(names, tables))
    if args.plot:
        report.plot_curves(runs, args.plot, args.title)
    text = report.format_report(summaries, radii, args.format, args.title)
    if args.per_class and args.format == "csv":
        text += report.format_csv_rows(report.per_class_rows(runs, radii))
    elif args.per_class:
        text += "".join("\n" + report.format_per_class(name, table, radii, args.format)
                        for name, table in runs)
    sys.stdout.write(text)
    sys.stdout.flush()
    for warning in report.setting_warnings(runs):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


def _run_labels(labels: Sequence[str] | None, paths: Sequence[str]) -> list[str]:
    """The runs' names: the --label of each file, or the file names."""
    if labels is None:
        return report.run_names(paths)
    if len(labels) != len(paths):
        raise ArgumentError(f"--label given {len(labels)} times for {len(paths)} results files: "
                            "give one --label per file, in the files' order")
    return list(labels)


def _merge(args: argparse.Namespace) -> int:
    files = args.files or merge.find_shards(args.out)
    result = merge.merge_results(files, args.out, args.data)
    _warn_dropped(result.dropped)
    print(f"merged {result.rows} rows from {len(result.inputs)} files into {result.out}"
          + (f" ({result.collapsed} duplicate rows collapsed)" if result.collapsed else ""))
    if result.memory is not None:
        print(Memory.describe(result.memory))
    return 0


def _warn_raw(summaries: Iterable[report.Summary]) -> None:
    for summary in summaries:
        if summary.memory is not None and summary.memory["raw"]:
            print(f"{PROG}: warning: {summary.name} holds {summary.memory['raw']} raw shard rows "
                  "of a data-dependent run, not yet answered by the memory (not sound alone): "
                  f"report the file '{PROG} merge' writes", file=sys.stderr)


def _warn_dropped(dropped: Iterable[tuple[Path, str]]) -> None:
    for path, line in dropped:
        print(f"{PROG}: warning: {path}: dropped a partial last line (a write cut short): "
              f"{line[:60]!r}", file=sys.stderr)


def run_spec(args: argparse.Namespace) -> tuple[jobs.RunSpec, dict]:
    """The parsed flags of a run as the job's files and selection, and the engine's config
    fields: each flag's ``dest`` is its field's name (``sigma`` None when not given: the job
    takes the checkpoint's)."""
    if args.model is None:
        raise ArgumentError("give the base classifier with --model CKPT "
                            "(or try --demo, which uses the shipped one)")
    if args.radii is not None and not args.sequential:
        raise ArgumentError("--radii steers --sequential certification: add --sequential, "
                            "or drop --radii")
    spec = jobs.RunSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(jobs.RunSpec)})
    return spec, {name: getattr(args, name) for name in CONFIG_FIELDS}


def flag_of(parser: argparse.ArgumentParser | None, argv: Sequence[str], field: str) -> str:
    """How the command line spells config field ``field``: the flag whose ``dest`` it is, as
    given in ``argv`` when given (``--num-samples`` for ``--n``), else its first spelling;
    the field's name when no flag sets it."""
    for action in parser._actions if parser is not None else ():
        if action.dest == field and action.option_strings:
            given = [flag for flag in action.option_strings if flag in argv]
            return (given or action.option_strings)[0]
    return field


def setting_of(parser: argparse.ArgumentParser | None, argv: Sequence[str], field: str,
               value: str) -> str:
    """How the command line gives config field ``field`` the value ``value`` (``True``,
    ``False`` or a value's text): the switch that sets it (``--resume``, ``--no-augment``),
    else the flag and the value."""
    for action in parser._actions if parser is not None else ():
        if action.dest == field and action.option_strings and action.nargs == 0:
            if isinstance(action, argparse.BooleanOptionalAction):
                return next(flag for flag in action.option_strings
                            if flag.startswith("--no-") == (value == "False"))
            return action.option_strings[0] if str(action.const) == value else \
                f"no {action.option_strings[0]}"
    return f"{flag_of(parser, argv, field)} {value}"


def _run(args: argparse.Namespace) -> int:
    temporary = demo.configure(args) if args.demo else None
    try:
        return _run_and_say(args, temporary is not None)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _run_and_say(args: argparse.Namespace, temporary: bool) -> int:
    spec, fields = run_spec(args)
    out = jobs.run(spec, fields, notify=lambda line: print(line, file=sys.stderr))
    if distributed.from_environment().rank != 0:
        return 0
    _print_memory_report(out)
    if args.shard is not None:
        print(f"results in {out}; when every shard is done: '{PROG} merge --out {args.out}'")
        return 0
    if not args.demo:
        print(f"results in {out}; see them with '{PROG} report {out}'")
        return 0
    table = results.read_results(out)
    radii = report.parse_radii(demo.RADII)
    sys.stdout.write(report.format_report([report.summarize(table, radii, "demo")], radii))
    sigma = results.read_sidecar(out).settings["sigma"]
    sys.stdout.write(demo.explanation(args.norm, sigma, args.n, args.alpha))
    print(demo.where_results_are(out, temporary))
    return 0


def _print_memory_report(out: Path) -> None:
    """The memory's report of a data-dependent run (kept in its sidecar's info)."""
    sidecar = results.read_sidecar(out)
    if sidecar is not None and "memory" in sidecar.info:
        print(Memory.describe(sidecar.info["memory"]))


def _train_parser() -> argparse.ArgumentParser:
    from certify import train_cli  # imported on use: training needs what a report does not
    return train_cli.parser()


def _train(args: argparse.Namespace) -> int:
    from certify import train_cli
    return train_cli.run(args)


def _train_denoiser_parser() -> argparse.ArgumentParser:
    from certify import train_denoiser_cli
    return train_denoiser_cli.parser()


def _train_denoiser(args: argparse.Namespace) -> int:
    from certify import train_denoiser_cli
    return train_denoiser_cli.run(args)


SUBCOMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser],
                             Callable[[argparse.Namespace], int]]] = {
    "report": (report_parser, _report),
    "merge": (merge_parser, _merge),
    "train": (_train_parser, _train),
    "train-denoiser": (_train_denoiser_parser, _train_denoiser),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``certify`` command line; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        make_parser, command = SUBCOMMANDS[argv.pop(0)]
    else:
        make_parser, command = run_parser, _run
    parser = None
    try:
        parser = make_parser()
        if command is _run and "--demo" in argv:
            parser.set_defaults(**demo.DEFAULTS)
        return command(parser.parse_args(argv))
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except ArgumentError as error:
        flag = lambda field: flag_of(parser, argv, field)  # noqa: E731
        message = error.spelled(flag, lambda field: f"{flag(field)} ",
                                lambda field, value: setting_of(parser, argv, field, value))
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except jobs.Interrupted as interrupted:
        print(f"{PROG}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before any row was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (AncerError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
