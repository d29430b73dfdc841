"""The `ablate` command: parses arguments and calls the library; nothing else lives here.

Every subcommand's flags are defined here (`ablate bench`'s too, built only when asked for,
since they name the benchmark's defaults and importing it starts JAX).

Exit codes: 0 done, 1 unexpected error, 2 bad config or arguments, 3 bad data,
4 training diverged (NaN/Inf), 74 the run folder cannot be written or holds a damaged file
(disk full, not a folder, in use by another process, a damaged checkpoint or JSON-lines
file), 75 stopped by SIGTERM after saving (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 75
EXIT_IO = 74


def _train(args) -> int:
    from ablate.experiment import load_experiment, safe_join
    from ablate.train import train

    exp, _ = load_experiment(args.experiment, args.set)
    run_dir = safe_join(args.workdir, exp.name)
    result = train(
        exp, run_dir, progress=not args.quiet, allow_config_change=args.allow_config_change
    )
    acc = result.final.get("accuracy", [])
    print(f"run folder: {run_dir}")
    for seed, a in zip(result.seeds, acc):
        print(f"  seed {seed}: eval accuracy {a:.3f} (chance {result.chance:.3f})")
    print(f"TensorBoard: ablate tensorboard {run_dir}")
    return EXIT_OK


#: The flags of each remote executor, with their defaults: given with another executor they
#: would be ignored, so they are refused.
EXECUTOR_FLAGS = {
    "ray": {"ray_address": None, "cpus_per_point": 1.0, "gpus_per_point": 0.0, "retries": 2},
    "slurm": {
        "slurm_partition": None,
        "slurm_gpus_per_job": 0,
        "slurm_cpus_per_job": 1,
        "slurm_time": "60",
        "slurm_array_parallelism": 256,
        "slurm_option": [],
        "slurm_cluster": "slurm",
    },
}


def _sweep(args) -> int:
    from ablate.config import ConfigError
    from ablate.executors import RayOptions, SlurmOptions, parse_minutes
    from ablate.sweep import run_sweep

    for executor, flags in EXECUTOR_FLAGS.items():
        given = [f for f, default in flags.items() if getattr(args, f) != default]
        if given and args.executor != executor:
            names = ", ".join("--" + f.replace("_", "-") for f in given)
            msg = f"{names} apply only with --executor {executor} (not {args.executor})"
            raise ConfigError([("--executor", msg)])
    options = None
    if args.executor == "ray":
        options = RayOptions(
            address=args.ray_address,
            cpus_per_point=args.cpus_per_point,
            gpus_per_point=args.gpus_per_point,
            retries=args.retries,
        )
    elif args.executor == "slurm":
        if bad := [o for o in args.slurm_option if "=" not in o]:
            raise ConfigError([("--slurm-option", f"{bad[0]!r} must be KEY=VALUE")])
        extra = dict(o.partition("=")[::2] for o in args.slurm_option)
        options = SlurmOptions(
            partition=args.slurm_partition,
            gpus_per_job=args.slurm_gpus_per_job,
            cpus_per_job=args.slurm_cpus_per_job,
            time_minutes=parse_minutes(args.slurm_time),
            array_parallelism=args.slurm_array_parallelism,
            additional=extra,
            cluster=args.slurm_cluster,
        )
    summary = run_sweep(
        args.experiment,
        overrides=args.set,
        workdir=args.workdir,
        progress=not args.quiet,
        report=not args.no_report,
        executor=args.executor,
        shard=args.shard,
        options=options,
    )
    print(summary)
    return EXIT_OK


def _report(args) -> int:
    from ablate.report import write_report
    from ablate.sweep import collect_results, points_without_rows

    collect_results(args.sweep_dir)  # what shards and workers left in the run folders
    path = write_report(args.sweep_dir)
    print(f"report: {path}")
    if missing := points_without_rows(args.sweep_dir):
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(
            f"note: {len(missing)} points of sweep.json have no rows yet ({shown}): shards or "
            "workers still running, or a worker whose folder is not on the shared storage; "
            "the report covers the others"
        )
    return EXIT_OK


def _view(args) -> int:
    from ablate.view import write_view

    print(f"view: {write_view(args.folder, args.out)}")
    return EXIT_OK


def _tensorboard(args) -> int:
    from ablate.tb_server import serve

    serve(args.logdir, port=args.port)
    return EXIT_OK


def _probe(args) -> int:
    from ablate.config import ConfigError
    from ablate.distributed import is_primary
    from ablate.probe import probe_run, summary

    if (args.run_dir is None) == (args.pretrained is None):
        msg = "give a run folder, or --pretrained NAME (a hub name or a checkpoint folder)"
        raise ConfigError([("probe", f"{msg}, not both" if args.run_dir else msg)])
    if args.pretrained is not None:
        return _probe_pretrained(args)
    text_flags = [f for f in PRETRAINED_FLAGS if getattr(args, f) is not None]
    if text_flags:
        flags = ", ".join("--" + f.replace("_", "-") for f in text_flags)
        raise ConfigError([("probe", f"{flags} apply only with --pretrained")])
    try:
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    except ValueError:
        msg = f"{args.seeds!r} is not a comma-separated list of integers"
        raise ConfigError([("seeds", msg)]) from None
    result = probe_run(args.run_dir, args.kinds, args.heads, seeds, args.out, chunk=args.chunk)
    if is_primary():  # process 0 prints and writes for all
        print(summary(result))
    return EXIT_OK


#: `ablate probe` flags of a pretrained model's probe (None: not given).
PRETRAINED_FLAGS = (
    "text", "split", "text_column", "text_config", "seq_len", "batch_size", "batches",
    "mask_rate", "seed",
)  # fmt: skip


def _probe_pretrained(args) -> int:
    from ablate.config import ConfigError
    from ablate.pretrained_probe import probe_pretrained

    if args.seeds is not None:
        raise ConfigError([("seeds", "a pretrained model has no seeds; use --seed for the text")])
    given = {f: getattr(args, f) for f in PRETRAINED_FLAGS if getattr(args, f) is not None}
    result = probe_pretrained(
        args.pretrained, kinds=args.kinds, heads=args.heads, chunk=args.chunk, out_dir=args.out,
        **given,
    )  # fmt: skip
    print(Path(result["files"][-1]).read_text())
    print(f"table, plots and summary: {Path(result['files'][0]).parent}")
    return EXIT_OK


def _bench(args) -> int:
    from ablate.bench import bench, make_plan, summary

    plan = make_plan(
        quick=args.quick,
        shapes=args.shapes,
        large=args.large,
        dtype=args.dtype,
        variants=args.variants,
        seeds=args.seeds,
    )
    result = bench(plan, args.out, probe=not args.no_probes, log=lambda s: print(s, flush=True))
    print(summary(result))
    if args.out:
        print(f"wrote {args.out}")
    return EXIT_OK


def _list(args) -> int:
    from ablate.attention import MIXERS
    from ablate.tasks import TASKS, task_names

    print("attention variants:")
    for name, cls in MIXERS.items():
        print(f"  {name:14s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    from ablate.tasks import make_task

    print("tasks (what each needs at its default knobs):")
    for name in task_names():
        cls = TASKS[name]
        # A synthetic task's need can depend on its knobs (assoc_recall's pair tokens).
        need = make_task(name).context_need if cls.has_dependencies else cls.context_need
        print(f"  {name:16s} [{need}] {(cls.__doc__ or '').strip().splitlines()[0]}")
    if args.levels:
        from ablate.reference import reference_levels

        print(
            "reference levels at the default knobs (each task's own reading: causal, or "
            "bidirectional for masked LM; +- standard error):"
        )
        for name in task_names():
            if not TASKS[name].has_dependencies:
                print(f"  {name:16s} not computable: real data has no known generating rule")
                continue
            levels = reference_levels(make_task(name))
            print(
                f"  {name:16s} chance {levels.chance}, fixed routing {levels.fixed_routing}, "
                f"bag {levels.bag}",
                flush=True,
            )
    return EXIT_OK


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from ablate import bench  # imports JAX: only for `ablate bench`

    p.description = bench.__doc__.splitlines()[0]
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (~20 s)")
    p.add_argument(
        "--shapes",
        help="comma-separated from quick,medium,gpt2_small (default: all the device allows)",
    )
    p.add_argument("--large", action="store_true", help="run gpt2_small on a CPU too")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on accelerators")
    p.add_argument(
        "--variants",
        help="comma-separated, or 'all' (default: all causal ones on accelerators; on a CPU "
        f"{','.join(bench.QUICK_SWEEP_VARIANTS)})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=bench.SEEDS,
        help=f"K for vmapped vs sequential ({bench.SEEDS})",
    )
    p.add_argument(
        "--no-probes",
        action="store_true",
        help="skip the subprocesses (compile cache, malloc, seeds over CPU devices)",
    )


def _sweep_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where `ablate sweep` runs its points (README: "Sweeps across machines")."""
    p.add_argument(
        "--executor",
        default="local",
        help="local (default: one point after another here), ray (Ray tasks) or slurm "
        "(a SLURM job array through submitit)",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run only points I, I+N, I+2N, ... here (any launcher); merge: ablate report DIR",
    )
    g = p.add_argument_group("--executor ray")
    g.add_argument("--ray-address", help="cluster address (default: start a local Ray instance)")
    ray, slurm = EXECUTOR_FLAGS["ray"], EXECUTOR_FLAGS["slurm"]
    g.add_argument(
        "--cpus-per-point", type=float, default=ray["cpus_per_point"], help="CPUs per point (1)"
    )
    g.add_argument(
        "--gpus-per-point",
        type=float,
        default=ray["gpus_per_point"],
        help="share of a GPU per point: 0.25 packs four points onto one (default 0: CPU only)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=ray["retries"],
        help="runs again of a point whose worker died (2)",
    )
    g = p.add_argument_group("--executor slurm")
    g.add_argument("--slurm-partition", help="partition (default: the cluster's)")
    g.add_argument(
        "--slurm-gpus-per-job",
        type=int,
        default=slurm["slurm_gpus_per_job"],
        help="GPUs per array task (0)",
    )
    g.add_argument(
        "--slurm-cpus-per-job",
        type=int,
        default=slurm["slurm_cpus_per_job"],
        help="CPUs per array task (1)",
    )
    g.add_argument(
        "--slurm-time",
        default=slurm["slurm_time"],
        help="time limit: minutes or H:MM:SS (60)",
    )
    g.add_argument(
        "--slurm-array-parallelism",
        type=int,
        default=slurm["slurm_array_parallelism"],
        help="array tasks at once (256)",
    )
    g.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sbatch option, e.g. account=myproj (repeatable)",
    )
    g.add_argument(
        "--slurm-cluster",
        default="slurm",
        help="slurm, or local: submitit runs the array on this machine (to try a setup)",
    )


def build_parser(bench_flags: bool = True) -> argparse.ArgumentParser:
    """The parser of every subcommand; `bench_flags=False` leaves `ablate bench`'s flags out
    (building them imports JAX), as `main` does for any other command."""
    parser = argparse.ArgumentParser(
        prog="ablate",
        description="How much does a task depend on attention learning context? "
        "Train, sweep, ablate and report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def experiment_args(p):
        p.add_argument("experiment", help="experiment file (TOML)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set model.n_layers=4 (repeatable)",
        )
        p.add_argument("--workdir", default="runs", help="root folder for outputs (default: runs)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train one experiment (all its seeds at once)")
    experiment_args(p)
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume into a run folder even if its saved config differs",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="grid of tasks x variants x seeds, then the report")
    experiment_args(p)
    p.add_argument(
        "--no-report", action="store_true", help="skip the report and view.html at the end"
    )
    _sweep_executor_arguments(p)
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="(re)write the report of a sweep folder")
    p.add_argument("sweep_dir")
    p.set_defaults(func=_report)

    p = sub.add_parser("view", help="write view.html: attention token by token, for a browser")
    p.add_argument("folder", help="a sweep folder or a run folder")
    p.add_argument("--out", help="where to write the page (default: FOLDER/view.html)")
    p.set_defaults(func=_view)

    p = sub.add_parser("tensorboard", help="serve TensorBoard for a run or sweep folder")
    p.add_argument("logdir")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.set_defaults(func=_tensorboard)

    p = sub.add_parser(
        "probe",
        help="ablate heads of a trained run, or of a pretrained GPT-2/BERT on text: drop per "
        "head, importance, pruning curve",
    )
    p.add_argument(
        "run_dir", nargs="?", help="a run folder made by `ablate train` or `ablate sweep`"
    )
    p.add_argument(
        "--pretrained",
        metavar="NAME",
        help="probe a pretrained model instead: gpt2 ... gpt2-xl, bert-base-uncased ..., a hub "
        "owner/name, or a folder with config.json, model.safetensors and tokenizer.json",
    )
    g = p.add_argument_group("pretrained models (with --pretrained)")
    g.add_argument(
        "--text", help="text to probe on: a local txt/jsonl/csv/parquet file or folder, or a "
        "hub dataset (default: this Python's standard library sources, no download)"
    )  # fmt: skip
    g.add_argument("--split", help="dataset split (default: train)")
    g.add_argument("--text-column", help="text column (default: text)")
    g.add_argument("--text-config", help="a hub dataset's configuration (e.g. wikitext-2-raw-v1)")
    g.add_argument("--seq-len", type=int, help="window length, at most the context (default: 128)")
    g.add_argument("--batch-size", type=int, help="windows per batch (default: 8)")
    g.add_argument("--batches", type=int, help="batches per set (default: 8)")
    g.add_argument("--mask-rate", type=float, help="BERT: share of tokens masked (default: 0.15)")
    g.add_argument("--seed", type=int, help="document order, windows, masks (default: 0)")
    p.add_argument(
        "--kinds",
        default="zero,mean,uniform,random,mean_pattern,resample",
        help="comma-separated ablation kinds (default: all)",
    )
    p.add_argument(
        "--heads",
        help="ablations, comma-separated: L:H one head, L:* a whole layer, L:H+L:H a set "
        "(default: every head, one at a time); an encoder-decoder's heads are PART:L:H with "
        "PART encoder, decoder or cross",
    )
    p.add_argument("--seeds", help="comma-separated seeds (default: all trained)")
    p.add_argument(
        "--out", help="output folder (default: RUN_DIR/probe, or ./probe-NAME when pretrained)"
    )
    p.add_argument(
        "--chunk",
        type=int,
        help="ablations evaluated side by side (default: all; with --pretrained, as many as "
        "fit in about 2 GB of activations)",
    )
    p.set_defaults(func=_probe)

    p = sub.add_parser(
        "bench",
        help="measure steps/s, tokens/s, compile time, FLOP/s and MFU on this device "
        "(ablate bench --help for its flags)",
    )
    if bench_flags:
        _bench_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("list", help="list attention variants, tasks and their reference levels")
    p.add_argument(
        "--no-levels",
        dest="levels",
        action="store_false",
        help="skip the reference levels (computing them takes a few seconds per task)",
    )
    p.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line: first of all, opt-in malloc settings (ablate/malloc.py)
        from ablate.config import ConfigError
        from ablate.malloc import restart_with_tunables

        try:
            restart_with_tunables()
        except ConfigError as e:
            print(f"ablate: {e}", file=sys.stderr)
            return EXIT_CONFIG
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(bench_flags=argv[:1] == ["bench"]).parse_args(argv)

    from ablate.config import ConfigError

    try:
        if args.command in ("train", "sweep", "probe"):
            # Connects the processes of a multi-process launch; nothing for a single one.
            from ablate.distributed import initialize

            initialize()
        return args.func(args)
    except ConfigError as e:
        print(f"ablate: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("ablate: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from ablate.checkpoint import CheckpointError
        from ablate.data import DataError
        from ablate.distributed import OtherProcessFailed
        from ablate.runfolder import DamagedFile
        from ablate.train import Diverged, Preempted

        codes = [
            (DataError, EXIT_DATA),
            (Diverged, EXIT_DIVERGED),
            (Preempted, EXIT_PREEMPTED),
            (OtherProcessFailed, EXIT_ERROR),
            ((CheckpointError, OSError, DamagedFile), EXIT_IO),
        ]
        for kind, code in codes:
            if isinstance(e, kind):
                print(f"ablate: {e}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
