"""The ``distrain`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

from distrain.config import load_config, reference_markdown, to_yaml
from distrain.errors import EXIT_PREEMPTED, ConfigError, UserError

log = logging.getLogger("distrain")

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, e.g. configs/gpt-cpu-tiny.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides, applied over the YAML (CLI > YAML > defaults)",
    )


def _add_run_args(q) -> None:
    """A launch's config, overrides, worker count and dry run."""
    _add_config_args(q)
    q.add_argument(
        "--workers",
        default=None,
        help="number of workers, or MIN-MAX for an elastic job (default: cluster.workers)",
    )
    q.add_argument(
        "--dry-run", action="store_true", help="check the config, data and batch layout; start nothing"
    )


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run on Ray Train workers: a local Ray cluster, or an existing one")
    lsub = p.add_subparsers(dest="launch_mode", required=True)
    q = lsub.add_parser(
        "local", help="start a one-node Ray cluster on this machine and run the workers on it"
    )
    _add_run_args(q)
    q.add_argument(
        "--node-ip",
        default="127.0.0.2",
        help="address the local Ray node binds (default 127.0.0.2: loopback; 127.0.0.1 is rewritten by Ray)",
    )
    q = lsub.add_parser("ray", help="run on a running Ray cluster")
    _add_run_args(q)
    q.add_argument(
        "--address",
        default=None,
        help="cluster address HOST:PORT (default: cluster.address, then RAY_ADDRESS)",
    )


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `distrain train`")


def _add_step(p: argparse.ArgumentParser) -> None:
    """Which of the run's checkpoints."""
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint's step (default: the newest that verifies)"
    )


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train in this process (one CPU or GPU; or one rank under torchrun)")
    _add_config_args(p)
    p = sub.add_parser(
        "resume", help="continue RUN_DIR from its newest valid checkpoint, with its config.yaml"
    )
    _add_run_dir(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides, e.g. train.steps=2000 to train longer",
    )


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write consolidated fp32 weights of a checkpoint (any ZeRO stage)")
    _add_run_dir(p)
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--format",
        required=True,
        choices=["safetensors", "hf", "torchvision"],
        help="safetensors (any model), hf (gpt: transformers directory), torchvision (resnet: state dict)",
    )
    _add_step(p)


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="draw new samples from a checkpoint: an image grid (GAN, VAE) or text (--prompt, LMs)"
    )
    _add_run_dir(p)
    _add_step(p)
    p.add_argument("--n", type=int, default=64, help="samples to draw (default 64; 8 per row of the grid)")
    p.add_argument("--out", default=None, help="the PNG grid to write (images)")
    p.add_argument("--prompt", default=None, help="a language model: print continuations of this text")
    p.add_argument("--tokens", type=int, default=64, help="--prompt: tokens to generate (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents or of the sampling (default 0)")


# `submit slurm` flags: (flag, cluster.slurm key, type)
SLURM_FLAGS = (
    ("--nodes", "nodes", int),
    ("--gpus-per-node", "gpus_per_node", int),
    ("--cpus-per-task", "cpus_per_task", int),
    ("--time", "time", str),
    ("--partition", "partition", str),
    ("--account", "account", str),
    ("--qos", "qos", str),
    ("--constraint", "constraint", str),
)


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit a run to a scheduler")
    ssub = p.add_subparsers(dest="submit_mode", required=True)
    q = ssub.add_parser(
        "slurm",
        help="render the Slurm job script (Ray on the allocation, or one node without Ray) into RUN_DIR/slurm/ and sbatch it",
    )
    _add_config_args(q)
    for flag, key, kind in SLURM_FLAGS:
        q.add_argument(flag, dest=key, type=kind, default=None, help=f"as cluster.slurm.{key}")
    q.add_argument("--dry-run", action="store_true", help="print the checks and the script; submit nothing")


def _add_status(sub) -> None:
    p = sub.add_parser(
        "status", help="a run's state, step, newest checkpoint, restarts, Slurm job and W&B run"
    )
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--json", action="store_true", help="print it as JSON")


def _add_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="helpers the Slurm job script calls")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    q = csub.add_parser("wait-ray", help="wait until N Ray nodes have joined ADDRESS")
    q.add_argument("--address", required=True)
    q.add_argument("--nodes", type=int, required=True)
    q.add_argument("--timeout", type=float, default=300)
    q.add_argument(
        "--pids", type=int, nargs="*", default=[], help="the nodes' srun steps: fail at once if one ends"
    )
    q = csub.add_parser("ports", help="print the base of the job's first block of free ports on this node")
    q.add_argument("--job-id", required=True)
    q.add_argument(
        "--after", type=int, default=None, help="a block found taken on another node: the next one"
    )
    q.add_argument(
        "--check", type=int, default=None, help="exit 1 unless the block at this base is free here"
    )


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory per GPU, step time, days, energy and CO2e of a config at any scale (no GPU)"
    )
    _add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: cluster.workers)")
    p.add_argument("--gpu", default=None, help="the card, a name of the peak table (default: H100)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to plan with (0-1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write plots (PNG) and a markdown summary of a run")
    _add_run_dir(p)
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show, validate or document configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    _add_config_args(csub.add_parser("show", help="print the resolved config as YAML"))
    _add_config_args(
        csub.add_parser("validate", help="exit 0 if the config is valid, else 1 with the reason")
    )
    csub.add_parser("reference", help="print every config key with its default and description (markdown)")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser(
        "prepare", help="write the tiny configs' data (pydoc texts, scikit-learn digits) under --out"
    )
    q.add_argument("--out", default="data", help="output directory (default: data)")
    q = dsub.add_parser(
        "index",
        help="build (or check) a source's manifest in the cache ($DISTRAIN_CACHE_DIR) before a job, so its ranks only read it",
    )
    q.add_argument("path", help="a file, directory, glob or fsspec URL, as data.train_path")
    q.add_argument("--format", default="auto", help="as data.format (default: auto)")
    q.add_argument("--split", default="train", help="as data.split, for format hf (default: train)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="distrain",
        description="Distributed training on DeepSpeed and Ray, from one CPU process to a GPU cluster.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,  # and resume
        _add_export,
        _add_sample,
        _add_launch,
        _add_submit,
        _add_status,
        _add_cluster,
        _add_plan,
        _add_report,
        _add_config,
        _add_data,
    ):
        add(sub)
    return ap


def _fail(msg: str) -> int:
    sys.stderr.write(f"distrain: error: {msg}\n")
    return EXIT_ERROR


def _train(args) -> int:
    try:  # every rank under torchrun, before the process group forms
        cfg = _train_config(args)
    except UserError:
        if int(os.environ.get("RANK", "0")) != 0:  # the same refusal on every rank: rank 0 prints it
            sys.exit(EXIT_ERROR)
        raise
    from distrain.train import run

    summary = run(cfg)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return {"completed": EXIT_OK, "preempted": EXIT_PREEMPTED}.get(summary["status"], EXIT_INTERRUPTED)


def _train_config(args):
    """``train``/``resume``: the config, and every check that can refuse the launch."""
    from distrain.layout import preflight, process_sizes

    if args.command == "resume":
        from pathlib import Path

        config = Path(args.run_dir) / "config.yaml"
        if not config.is_file():
            raise ConfigError(
                f"{args.run_dir} has no config.yaml: is it a run directory written by `distrain train`?"
            )
        cfg = load_config(config, [*args.overrides, f"run.dir={args.run_dir}", "checkpoint.resume=true"])
    else:
        cfg = load_config(args.config, args.overrides)
    return preflight(cfg, *process_sizes())[0]


def _launch(args) -> int:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(_workers_override(args.workers))
    cfg = load_config(args.config, overrides)
    from distrain.tracking import setup_logging

    setup_logging(0, cfg.run.log_level)
    if args.dry_run:
        from distrain.layout import launch_sizes, preflight
        from distrain.plan import format_plan, plan

        cfg, lines = preflight(cfg, *launch_sizes(cfg))
        for line in lines:
            print(line)
        print(format_plan(plan(cfg, cfg.cluster.max_workers)))
        print("--dry-run: nothing written, nothing started")
        return EXIT_OK
    from ray.train import TrainingFailedError

    from distrain.cluster.control import new_launch, write_notice
    from distrain.cluster.ray import launch, worker_failures

    launch_id, run_dir = new_launch(), cfg.run.run_dir.resolve()

    def on_notice(signum, frame):  # Slurm's --signal, a scheduler's SIGTERM: every worker checkpoints
        log.warning(
            "%s: asking every worker to finish its step, checkpoint and stop", signal.Signals(signum).name
        )
        write_notice(run_dir, launch_id, signal.Signals(signum).name)

    signal.signal(signal.SIGUSR1, on_notice)
    signal.signal(signal.SIGTERM, on_notice)
    try:
        if args.launch_mode == "local":
            summary = launch(cfg, local=True, node_ip=args.node_ip)
        else:
            summary = launch(cfg, address=args.address)
    except TrainingFailedError as exc:
        for line in worker_failures(exc):
            sys.stderr.write(f"distrain: error: {line}\n")
        return EXIT_ERROR
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return {"completed": EXIT_OK, "preempted": EXIT_PREEMPTED}.get(summary.get("status"), EXIT_ERROR)


def _workers_override(text: str) -> str:
    """``--workers N`` or ``--workers MIN-MAX`` as a cluster.workers override."""
    lo, sep, hi = text.partition("-")
    if not (lo.isdigit() and (not sep or hi.isdigit())):
        raise ConfigError(f"--workers {text}: give a number of workers (4) or an elastic range MIN-MAX (2-4)")
    return f"cluster.workers={{min: {lo}, max: {hi}}}" if sep else f"cluster.workers={lo}"


def _submit(args) -> int:
    overrides = list(args.overrides)
    for _, key, _ in SLURM_FLAGS:
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"cluster.slurm.{key}={value}")
    cfg = load_config(args.config, overrides)
    from distrain.cluster.slurm import submit

    out = submit(cfg, dry_run=args.dry_run)
    s = cfg.cluster.slurm
    checks = f"{s.nodes} node(s) x {max(1, s.gpus_per_node)} worker(s) = {out['workers']} rank(s), launcher {out['launcher']}"
    if args.dry_run:
        from distrain.plan import format_plan, plan

        sys.stdout.write(out["script"])
        print(f"# {checks}")
        print("\n".join(f"# {ln}" for ln in out["checks"]))
        print("\n".join(f"# {ln}" for ln in format_plan(plan(out["config"], out["workers"])).splitlines()))
        print("# --dry-run: nothing written, nothing submitted")
        return EXIT_OK
    print(f"{checks}; " + "; ".join(out["checks"][1:]))
    print(
        f"submitted job {out['job_id']}; log {out['log']}; follow it with `distrain status {out['run_dir']}`"
    )
    return EXIT_OK


def _sample(args) -> int:
    from distrain.samples import continue_text, draw

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: at least 1")
    if args.prompt is not None:
        for text in continue_text(args.run_dir, args.prompt, args.step, args.tokens, args.n, args.seed):
            print(text)
        return EXIT_OK
    if not args.out:
        raise ConfigError(
            "distrain sample: give --out FILE.png for an image grid (or --prompt TEXT for text)"
        )
    print(f"wrote {draw(args.run_dir, args.out, args.step, args.n, args.seed)}")
    return EXIT_OK


def _layout_line(cfg, gpus: int) -> str:
    """The data layout at ``gpus`` ranks, or why the data cannot be laid out there."""
    from distrain.layout import decide

    try:
        return decide(cfg, [gpus], f"--gpus {gpus}", run_dir=False)[1].line()
    except UserError as exc:
        return f"data: cannot be laid out on {gpus} ranks: {exc}"


def _config_reference(args) -> int:
    sys.stdout.write(reference_markdown())
    return EXIT_OK


def _config_show(args) -> int:
    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return EXIT_OK


def _config_validate(args) -> int:
    from distrain.config import elastic_layouts, mesh_summary

    cfg = load_config(args.config, args.overrides)
    print(f"{args.config}: valid")
    print(mesh_summary(cfg))
    if cfg.cluster.elastic:
        print(elastic_layouts(cfg))
    return EXIT_OK


def _plan(args) -> int:
    import json

    from distrain.plan import format_plan, plan

    # --gpus N: N workers with the config's global batch (grad_accum derived, as for an elastic size)
    sized = [f"cluster.workers={{min: {args.gpus}, max: {args.gpus}}}"] if args.gpus else []
    cfg = load_config(args.config, [*args.overrides, *sized])
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: a fraction in (0, 1], e.g. 0.4")
    out = plan(cfg, args.gpus, args.gpu, args.mfu)
    out["data_layout"] = _layout_line(cfg, out["gpus"])
    print(json.dumps(out, indent=2) if args.json else format_plan(out))
    return EXIT_OK


def _export(args) -> int:
    from distrain.export import export

    print(f"wrote {export(args.run_dir, args.format, args.out, args.step)}")
    return EXIT_OK


def _status(args) -> int:
    import json
    from pathlib import Path

    from distrain.status import print_status, status

    info = status(Path(args.run_dir))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_status(info)
    return EXIT_OK


def _cluster_ports(args) -> int:
    from distrain.cluster.slurm import block_free, free_block

    if args.check is not None:
        return EXIT_OK if block_free(args.check) else EXIT_ERROR
    print(free_block(args.job_id, args.after))
    return EXIT_OK


def _cluster_wait_ray(args) -> int:
    from distrain.cluster.slurm import wait_ray

    waited = wait_ray(args.address, args.nodes, args.timeout, args.pids)
    print(f"distrain: {args.nodes} Ray node(s) up at {args.address} after {waited:.0f} s", flush=True)
    return EXIT_OK


def _report(args) -> int:
    from pathlib import Path

    from distrain.metrics.report import write_report

    out = write_report(Path(args.run_dir), args.out)
    print(f"wrote {out / 'report.md'}")
    return EXIT_OK


def _data_index(args) -> int:
    import time

    from distrain.data.sources import build_manifest, cache_dir, detect_format

    t0 = time.perf_counter()
    fmt = detect_format(args.path, args.format, "path")
    man = build_manifest(args.path, fmt, "path", args.split)
    print(
        f"{args.path}: {fmt}, {len(man.files):,} files, {man.total:,} rows, {int(man.chunks.sum()):,} chunks, "
        f"digest {man.digest} ({time.perf_counter() - t0:.1f} s; cache {cache_dir()})"
    )
    return EXIT_OK


def _data_prepare(args) -> int:
    from distrain.data.prepare import prepare

    for path in prepare(args.out):
        print(f"wrote {path}")
    return EXIT_OK


def _train_and_exit(args) -> int:
    """``train`` and ``resume``. The run is over and its records are on disk: leave without
    interpreter teardown, where native libraries occasionally abort and would turn a finished run
    into a failure."""
    code = _train(args)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


# each subcommand's handler, by `command` or `command subcommand` (argparse's dests below)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train_and_exit,
    "resume": _train_and_exit,
    "export": _export,
    "sample": _sample,
    "launch": _launch,  # local and ray
    "submit": _submit,  # slurm
    "status": _status,
    "cluster wait-ray": _cluster_wait_ray,
    "cluster ports": _cluster_ports,
    "plan": _plan,
    "report": _report,
    "config show": _config_show,
    "config validate": _config_validate,
    "config reference": _config_reference,
    "data prepare": _data_prepare,
    "data index": _data_index,
}


def _command(args: argparse.Namespace) -> str:
    """The key of ``args``'s handler: the command, and the subcommand of those that have one."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `launch ... --workers N a=b`: overrides may follow the options
    if extra and (
        args.command not in ("launch", "submit", "plan")
        or any("=" not in x or x.startswith("-") for x in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command not in ("train", "resume", "launch", "plan"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[_command(args)](args)
    except UserError as exc:  # the message names the key, file or row and the fix
        if os.environ.get("DISTRAIN_DEBUG"):
            raise
        return _fail(str(exc))
    except KeyboardInterrupt:
        sys.stderr.write("distrain: aborted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
