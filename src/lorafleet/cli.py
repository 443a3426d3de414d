"""The ``lorafleet`` command line: run, report, assets, algorithms, config.

Errors a user can cause print as one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorafleet.config import ExperimentConfig
from lorafleet.errors import LorafleetError
from lorafleet.outdir import APP_ENTRIES, DEPLOY, FLOWER_APP, RUN, RUN_ENTRIES, check_output_dir

app = typer.Typer(
    name="lorafleet",
    help="Federated and split LoRA fine-tuning across heterogeneous devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
_RUNTIME_HELP = ExperimentConfig.model_fields["runtime"].description or ""
out_console = Console()


def _fail(message: str, code: int = 2) -> None:
    prefix = "" if message.startswith("config error:") else "error: "
    err_console.print(f"[bold red]{prefix}[/]{escape(message)}", highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # bitsandbytes: its CPU backend says, once per process, that the optional `kernels`
    # package is absent (it falls back to its own torch code)
    for noisy in ("transformers", "datasets", "peft", "httpx", "huggingface_hub",
                  "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("lorafleet").setLevel(logging.INFO if verbose else logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(
        help="Experiment YAML (see configs/); omit for the default demo (FSLoRA, MiniLM, "
        "BBC News).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory (default runs/<name>).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config field, e.g. --set train.lr=3e-4 (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its checkpoint.")] = False,
    runtime: Annotated[str | None, typer.Option(
        help="Override the config's `runtime`. " + _RUNTIME_HELP)] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars or round lines.")] = False,
    verbose: Annotated[bool, typer.Option(help="Log more (INFO).")] = False,
) -> None:
    """Run one experiment and write its run directory (metrics, summary, adapter, checkpoint)."""
    _setup_logging(verbose)
    from lorafleet.config import load_config, validate_config
    from lorafleet.rundir import RunDir
    from lorafleet.runtimes import run_experiment

    try:
        if out is not None:  # a file or a foreign directory: one line before anything loads
            check_output_dir(out, RUN, outputs=RUN_ENTRIES)
        overrides = list(set_ or []) + ([f"runtime={runtime}"] if runtime else [])
        if resume and config is None and not set_:
            cfg = None
            if out is None:
                _fail("--resume needs --out DIR (the run to continue)")
                return
            if runtime:  # the stored config, run elsewhere
                stored = RunDir(out).stored_config()
                cfg = validate_config({**stored.model_dump(mode="json"), "runtime": runtime})
        else:
            cfg = load_config(config, overrides)
        directory = out or Path("runs") / (cfg.name if cfg else "experiment")
        result = run_experiment(cfg, directory, resume=resume, console=err_console,
                                progress=not quiet, verbose=verbose)
    except LorafleetError as err:
        _fail(str(err))
        return
    except KeyboardInterrupt:
        _fail(f"interrupted; finished rounds are kept. Continue with: lorafleet run --out "
              f"{out or 'DIR'} --resume", code=130)
        return
    s = result.summary
    base = f" (initial model {s['base']:.4f})" if s.get("base") is not None else ""
    out_console.print(
        f"done: {s['algorithm']} on {s['rounds']} rounds — final {s['metric']} "
        f"{s['final']:.4f}, best {s['best']:.4f}{base}; bytes up {s['bytes_up']:,} down "
        f"{s['bytes_down']:,}; {s['wall_seconds']:.0f} s. Results in {directory}",
        highlight=False, soft_wrap=True,
    )


@app.command("deploy-local")
def deploy_local(
    config: Annotated[Path | None, typer.Argument(
        help="Experiment YAML (default: the demo); omit with --resume.")] = None,
    nodes: Annotated[int, typer.Option(
        help="flower-supernode processes to start; node i plays client i.")] = 2,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory (default runs/<name>); Flower's state and the "
        "processes' logs go to OUT/deploy.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config field (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its checkpoint.")] = False,
    tls_dir: Annotated[Path | None, typer.Option(
        "--tls-dir", help="Run over TLS instead of --insecure: a directory holding ca.crt, "
        "server.pem (SANs: 127.0.0.1) and server.key.")] = None,
    auth_keys: Annotated[Path | None, typer.Option(
        "--auth-keys", help="Authenticate SuperNodes (needs --tls-dir): a directory holding "
        "supernode-<i> and supernode-<i>.pub for each node i (OpenSSH ECDSA keys, e.g. "
        "ssh-keygen -t ecdsa -b 384 -N '' -f supernode-0); the public keys are registered "
        "with the SuperLink, any other node is refused.")] = None,
    node_data: Annotated[list[str] | None, typer.Option(
        "--node-data", help="I=PATH: node I trains on its own file PATH (its data-path) "
        "instead of its partition of the config's dataset (repeatable).")] = None,
    round_timeout: Annotated[float, typer.Option(
        help="Seconds a round waits for its nodes; a node that has not replied by then "
        "(killed, disconnected) is dropped from that round.")] = 3600.0,
    node_wait: Annotated[float, typer.Option(
        help="Seconds to wait, before round 1, for every client's node.")] = 120.0,
    resident: Annotated[bool, typer.Option(
        help="Start a resident trainer (lorafleet node) beside each SuperNode: it builds "
        "the experiment once and keeps the model loaded across rounds. --no-resident: each "
        "ClientApp builds the experiment itself, once per message (Flower 1.41 starts a "
        "process per message).")] = True,
    verbose: Annotated[bool, typer.Option(help="Log more (INFO).")] = False,
) -> None:
    """Run on a real Flower deployment on loopback: a flower-superlink, N flower-supernodes
    (each with a resident trainer) and `flwr run`; every process started is stopped at the
    end (also on Ctrl-C)."""
    _setup_logging(verbose)
    from lorafleet.config import load_config

    try:
        from lorafleet.runtimes.flower.deploy import Security
        from lorafleet.runtimes.flower.deploy import deploy_local as run_deployment
    except ImportError as err:
        _fail(f"deploy-local needs Flower ({err}); install the extra: "
              "pip install 'lorafleet[flower]'")
        return
    try:
        if out is not None:
            check_output_dir(out, RUN, outputs=RUN_ENTRIES)
        cfg = None if resume and config is None and not set_ else load_config(
            config, set_ or [])
        if resume and out is None:
            _fail("--resume needs --out DIR (the run to continue)")
            return
        directory = out or Path("runs") / (cfg.name if cfg else "experiment")
        run_deployment(cfg, directory, nodes=nodes, resume=resume, console=err_console,
                       security=Security(tls_dir=tls_dir, auth_dir=auth_keys),
                       node_data=_node_data(node_data or []),
                       round_timeout=round_timeout, node_wait=node_wait, resident=resident)
    except LorafleetError as err:
        _fail(str(err))
        return
    except KeyboardInterrupt:
        _fail(f"interrupted; every process started was stopped and finished rounds are "
              f"kept. Continue with: lorafleet deploy-local --out {out or 'DIR'} --resume",
              code=130)
        return
    s = json.loads((directory / "summary.json").read_text())
    out_console.print(
        f"done: {s['algorithm']} on {s['rounds']} rounds over {nodes} Flower node(s) — final "
        f"{s['metric']} {s['final']:.4f}; bytes up {s['bytes_up']:,} down "
        f"{s['bytes_down']:,}. Results in {directory}", highlight=False, soft_wrap=True)


def _node_data(items: list[str]) -> dict[int, Path]:
    """``--node-data I=PATH`` values as {node: path}."""
    out: dict[int, Path] = {}
    for item in items:
        node, sep, path = item.partition("=")
        if not sep or not node.strip().isdigit() or not path:
            raise LorafleetError(f"--node-data {item!r}: expected I=PATH, e.g. 0=data/mine.csv")
        out[int(node)] = Path(path)
    return out


@app.command()
def node(
    partition_id: Annotated[int, typer.Option(
        "--partition-id", help="The fleet client this device plays (its SuperNode's "
        "partition-id).")],
    socket_path: Annotated[Path, typer.Option(
        "--socket", help="Unix socket to listen on (created 0600; at most 107 bytes); its "
        "SuperNode's node config names it: trainer-socket=\"PATH\".")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="Build this experiment before the first request (the run's "
        "experiment.yaml); without it the trainer builds the server's experiment on the "
        "first train message. Either way it keeps it while messages name it.")] = None,
    data_path: Annotated[Path | None, typer.Option(
        "--data-path", help="Train on this file (read with the experiment's data fields) "
        "instead of the client's partition of the experiment's dataset.")] = None,
    device: Annotated[str | None, typer.Option(
        help="Compute on this device (auto, cpu, cuda, cuda:N, mps) instead of the "
        "experiment's `device`.")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="Keep what the client keeps between rounds (FedSA-LoRA's B) in "
        "this directory too, so a restarted trainer or a resumed run continues exactly "
        "(default: in memory only).")] = None,
    verbose: Annotated[bool, typer.Option(help="Log more (INFO: one line per round).")] = False,
) -> None:
    """Run a device's resident trainer: it keeps the model loaded and trains the Flower
    messages its SuperNode's ClientApp forwards (see docs/deploy.md). SIGTERM or Ctrl-C
    stops it."""
    _setup_logging(verbose)
    try:
        from lorafleet.runtimes.flower.node import run_node
    except ImportError as err:
        _fail(f"node needs Flower ({err}); install the extra: pip install 'lorafleet[flower]'")
        return
    try:
        run_node(socket_path, partition_id, config=config, data_path=data_path,
                 device=device, console=err_console, state_dir=state_dir)
    except LorafleetError as err:
        _fail(str(err))


@app.command("flower-app")
def flower_app(
    config: Annotated[Path | None, typer.Argument(
        help="Experiment YAML (default: the demo); omit with --resume.")] = None,
    app_dir: Annotated[Path, typer.Option(
        "--app", help="Where to write app/, experiment.yaml and run-config.toml.")] = Path(
        "flower-app"),
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory the ServerApp writes (default runs/<name>), on "
        "the SuperLink's machine.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config field (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its checkpoint.")] = False,
    round_timeout: Annotated[float, typer.Option(
        help="Seconds a round waits for its nodes; a node that has not replied by then "
        "is dropped from that round.")] = 3600.0,
    node_wait: Annotated[float, typer.Option(
        help="Seconds to wait, before round 1, for every client's node.")] = 120.0,
) -> None:
    """Write a Flower app for a deployment across machines (run it on the SuperLink's
    machine, then `flwr run APP/app CONNECTION --run-config APP/run-config.toml --stream`;
    see docs/deploy.md)."""
    from lorafleet.config import load_config

    try:
        from lorafleet.runtimes.flower.deploy import write_app
        from lorafleet.runtimes.flower.server_app import require_federated
    except ImportError as err:
        _fail(f"flower-app needs Flower ({err}); install the extra: "
              "pip install 'lorafleet[flower]'")
        return
    try:
        check_output_dir(app_dir, (FLOWER_APP, DEPLOY), option="--app", outputs=APP_ENTRIES)
        if out is not None:
            check_output_dir(out, RUN, outputs=RUN_ENTRIES)
        if resume and out is None:
            _fail("--resume needs --out DIR (the run to continue)")
            return
        cfg = None if resume and config is None and not set_ else load_config(
            config, set_ or [])
        if cfg is not None:
            require_federated(cfg)
        directory = out or Path("runs") / (cfg.name if cfg else "experiment")
        run_config = write_app(app_dir, cfg, directory, resume=resume,
                               round_timeout=round_timeout, node_wait=node_wait)
    except LorafleetError as err:
        _fail(str(err))
        return
    clients = f" (one per client, 0..{cfg.num_clients - 1})" if cfg else ""
    experiment = f" --config {app_dir / 'experiment.yaml'}" if cfg else ""
    out_console.print(
        f"wrote {app_dir / 'app'} and {run_config}. On each device{clients} start its resident "
        f"trainer, lorafleet node --partition-id I --socket SOCKET{experiment} (copy the file "
        f"there), and flower-supernode --node-config 'partition-id=I trainer-socket=\"SOCKET\"' "
        f"(see docs/deploy.md); then on this machine:\n"
        f"  flwr run {app_dir.resolve() / 'app'} CONNECTION --run-config {run_config} --stream",
        highlight=False, soft_wrap=True)


@app.command()
def compare(
    config: Annotated[Path | None, typer.Argument(help="Experiment YAML (default: the demo).")
                      ] = None,
    algorithms: Annotated[str, typer.Option(
        help="Comma-separated algorithms, e.g. fslora,fedavg,hetlora,flexlora,flora.")
    ] = "fslora,fedavg",
    seeds: Annotated[int, typer.Option(help="Seeds per algorithm (config seed, +1, ...).")] = 1,
    out: Annotated[Path, typer.Option("--out", "-o", help="Compare directory.")] = Path(
        "runs/compare"),
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config field for every run (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace results already in --out.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Keep finished runs in --out and finish the others.")] = False,
    runtime: Annotated[str | None, typer.Option(
        help="Override the config's `runtime` for every run. " + _RUNTIME_HELP)] = None,
    reference: Annotated[str | None, typer.Option(
        help="Also write differences.md/.csv: every algorithm's paired difference from this "
        "one (reference − method, seed by seed) with a 95 % interval.")] = None,
    tuned: Annotated[Path | None, typer.Option(
        help="A `lorafleet tune` output directory: each algorithm runs with the values "
        "tuned for it (its tuned.json).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars or round lines.")] = False,
) -> None:
    """Run several algorithms on identical data, fleet and seeds; write results.csv/md + plots."""
    _setup_logging(False)
    from lorafleet.compare import compare as run_compare
    from lorafleet.compare import parse_algorithms

    try:
        files = run_compare(config, parse_algorithms(algorithms), seeds, out,
                            overrides=[*(set_ or []), *([f"runtime={runtime}"] if runtime
                                                        else [])],
                            overwrite=overwrite, resume=resume, reference=reference,
                            tuned=tuned, console=err_console, progress=not quiet)
    except LorafleetError as err:
        _fail(str(err))
        return
    except KeyboardInterrupt:
        _fail(f"interrupted; finish with: lorafleet compare ... --out {out} --resume", code=130)
        return
    for name in ("results.md", "differences.md"):
        if (out / name).exists():
            out_console.print((out / name).read_text(), highlight=False)
    out_console.print(f"wrote {len(files)} files to {out}", highlight=False)


@app.command()
def tune(
    config: Annotated[Path | None, typer.Argument(help="Experiment YAML (default: the demo).")
                      ] = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", "-g", help="An axis of the grid, field=v1,v2,... (repeatable; the grid is "
        "their product), e.g. --grid train.lr=1e-4,3e-4,1e-3")] = None,
    algorithms: Annotated[str, typer.Option(
        help="Comma-separated algorithms; every one runs the whole grid.")] = "fslora,fedavg",
    seeds: Annotated[int, typer.Option(help="Seeds per grid point (config seed, +1, ...).")
                     ] = 1,
    out: Annotated[Path, typer.Option("--out", "-o", help="Tuning directory.")] = Path(
        "runs/tune"),
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config field for every run (repeatable).")] = None,
    select: Annotated[str, typer.Option(
        help="Choose by the mean validation `final` or `best` metric.")] = "final",
    resume: Annotated[bool, typer.Option(
        help="Keep finished runs in --out and finish the others.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars or round lines.")] = False,
) -> None:
    """Tune every algorithm on the same grid, on a validation split of the training data
    (never the evaluation split); writes tuned.json for `compare --tuned`."""
    _setup_logging(False)
    from lorafleet.compare import parse_algorithms
    from lorafleet.tune import parse_grid
    from lorafleet.tune import tune as run_tune

    try:
        result = run_tune(config, parse_algorithms(algorithms), parse_grid(grid or []), seeds,
                          out, overrides=list(set_ or []), select=select, resume=resume,
                          console=err_console, progress=not quiet)
    except LorafleetError as err:
        _fail(str(err))
        return
    except KeyboardInterrupt:
        _fail(f"interrupted; finish with: lorafleet tune ... --out {out} --resume", code=130)
        return
    out_console.print((out / "tuning.md").read_text(), highlight=False)
    for algo, point in result["chosen"].items():
        values = " ".join(f"{k}={v}" for k, v in point.items())
        out_console.print(f"{algo}: {values}", highlight=False)
    out_console.print(f"wrote {out / 'tuned.json'}; use it with: lorafleet compare CONFIG "
                      f"--tuned {out}", highlight=False)


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Run or compare directories.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Where plots and tables go (default: the first directory).")] = None,
    target: Annotated[str | None, typer.Option(
        help="Also tabulate the simulated time to reach METRIC=VALUE (e.g. perplexity=30; "
        "a bare VALUE targets the runs' own metric).")] = None,
    reference: Annotated[str | None, typer.Option(
        help="Also write differences.md/.csv: every method's paired difference from this "
        "one (reference − method, seed by seed) with a 95 % interval.")] = None,
    interval: Annotated[str, typer.Option(
        help="Interval of the paired differences: t (Student's t) or bootstrap.")] = "t",
) -> None:
    """Plot metric vs round, bytes and simulated time, and tabulate the runs."""
    from lorafleet.report import parse_target
    from lorafleet.report import report as make_report

    try:
        files = make_report(list(dirs), out or dirs[0],
                            parse_target(target) if target is not None else None,
                            reference=reference, interval=interval)
    except LorafleetError as err:
        _fail(str(err))
        return
    for f in files:
        out_console.print(str(f), highlight=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or not).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the model.")],
    merged: Annotated[bool, typer.Option(
        help="Merge the adapter into the base and write a full model.")] = False,
) -> None:
    """Export the global model of a run's latest checkpoint (PEFT adapter or merged model)."""
    _setup_logging(False)
    from lorafleet.runtimes.local import export_run

    try:
        path = export_run(run_dir, out, merged=merged)
    except LorafleetError as err:
        _fail(str(err))
        return
    out_console.print(f"wrote {'merged model' if merged else 'adapter'} to {path}",
                      highlight=False)


@app.command()
def assets(
    prepare: Annotated[bool, typer.Option(
        help="Convert and cache what needs it (SmolLM2 GGUF -> safetensors).")] = False,
) -> None:
    """List the embedded models and datasets (and prepare their caches)."""
    from lorafleet import assets as assets_mod

    table = Table(title=f"lorafleet assets (cache: {assets_mod.cache_dir()})")
    for col in ("name", "kind", "package", "status", "description"):
        table.add_column(col)
    try:
        for asset in assets_mod.ASSETS:
            if prepare and asset.kind == "model":
                assets_mod.prepare_model(asset.name)
            table.add_row(asset.name, asset.kind, asset.package,
                          assets_mod.asset_status(asset), asset.description)
    except LorafleetError as err:
        _fail(str(err))
    out_console.print(table)


@app.command()
def algorithms() -> None:
    """List the algorithms (federated, split learning, central), each with its options."""
    from lorafleet.algorithms import ALGORITHMS
    from lorafleet.algorithms.registry import FAMILIES

    width = max(len(name) for name in ALGORITHMS)
    ordered = sorted(ALGORITHMS.items(), key=lambda item: FAMILIES.index(item[1].family()))
    for name, cls in ordered:
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out_console.print(f"{name:{width}s}  {cls.family():9s}  {doc}", highlight=False,
                          soft_wrap=True)
        section = cls.options_section
        for field, info in cls.Options.model_fields.items() if section else ():
            default = json.dumps(info.get_default(call_default_factory=True))
            setting = f"{section}.{field}={default.strip(chr(34))}"
            out_console.print(f"{'':{width}s}  --set {setting:34s} {info.description or ''}",
                              highlight=False, soft_wrap=True)


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Argument(help="Experiment YAML (default: the demo).")
                      ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field.")
                    ] = None,
) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    from lorafleet.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except LorafleetError as err:
        _fail(str(err))
        return
    out_console.print(cfg.to_yaml(), highlight=False)


def main() -> None:
    """Entry point for ``python -m lorafleet``."""
    app()


if __name__ == "__main__":
    main()
