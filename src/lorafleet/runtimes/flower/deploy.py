"""``lorafleet deploy-local``: a real Flower deployment on this machine's loopback.

Starts one ``flower-superlink`` and N ``flower-supernode`` processes (node i plays client
``partition-id = i``), submits the lorafleet app with ``flwr run``, waits for the run to
finish and stops every process it started, their children included (also on Ctrl-C or an
error). The same commands, with TLS certificates and SuperNode authentication instead of
``--insecure``, deploy across machines.

Everything Flower keeps lives under ``OUT/deploy/``: ``flwr-home/`` (the ``flwr`` CLI's
config and installed apps), ``state.db`` (the SuperLink's state), one log per process,
``app/`` (a minimal Flower app naming lorafleet's installed ServerApp and ClientApp), and
``run-config.toml``. The run directory itself is OUT, as with ``lorafleet run``.

Each message runs in a fresh ``flwr-clientapp`` process on the SuperNode (Flower 1.41's
Deployment Engine): a node loads the base model once per message, not once per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
from rich.console import Console

from lorafleet.config import ExperimentConfig
from lorafleet.errors import LorafleetError
from lorafleet.rundir import RunDir
from lorafleet.runtimes.flower.server_app import require_federated

__all__ = ["Deployment", "deploy_local"]

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "lorafleet-app"
version = "1.0.0"
description = "lorafleet's Flower app: components of the installed lorafleet package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "lorafleet"

[tool.flwr.app.components]
serverapp = "lorafleet.runtimes.flower.server_app:app"
clientapp = "lorafleet.runtimes.flower.client_app:app"

[tool.flwr.app.config]
config = ""
set = ""
out = "runs/flower"
resume = false
round-timeout = 3600.0
node-wait = 120.0
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes], name: str,
                   log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LorafleetError(f"{name} exited with status {proc.returncode} while starting; "
                                 f"see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.3)
    raise LorafleetError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:g} s; "
                         f"see {log_path}")


def _toml_string(value: str) -> str:
    # A TOML basic string: JSON's escapes (backslash, quote, \n, \uXXXX) are TOML's too.
    return json.dumps(value)


@dataclass
class Deployment:
    """The processes of a loopback deployment; :meth:`stop` ends all of them.

    Attributes:
        home: ``OUT/deploy``.
        port: the SuperLink's port (Fleet, Control and ServerAppIo APIs).
        procs: (name, process) for every process started, in start order.
        seen: ids of every process known to belong to the deployment (with descendants
            found while it ran), for checks that nothing is left behind.
    """

    home: Path
    port: int
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, "FLWR_HOME": str(self.home / "flwr-home"),
                "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}

    def start(self, name: str, args: list[str], *, log: bool = True
              ) -> subprocess.Popen[bytes]:
        """Start ``args`` in its own session (a terminal's Ctrl-C reaches only lorafleet,
        which then stops it), its output in ``home/<name>.log`` or, without ``log``, ours."""
        out: IO[bytes] | None = None
        if log:
            out = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed by stop()
            self._logs.append(out)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if log else None,
                                env=self.env, cwd=self.home, start_new_session=True)
        self.procs.append((name, proc))
        self.seen.add(proc.pid)
        return proc

    def descendants(self) -> list[psutil.Process]:
        """Every live process the deployment started, children of children included."""
        found: dict[int, psutil.Process] = {}
        for _, proc in self.procs:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
        self.seen.update(found)
        return list(found.values())

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate every process (SIGTERM, then SIGKILL after ``timeout``) and reap them."""
        alive = self.descendants()
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(alive, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5.0)
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        for log in self._logs:
            log.close()
        self._logs.clear()


@contextlib.contextmanager
def _deployment(home: Path) -> Iterator[Deployment]:
    dep = Deployment(home=home, port=_free_port())
    try:
        yield dep
    finally:
        dep.stop()


def deploy_local(
    cfg: ExperimentConfig | None,
    out: Path,
    *,
    nodes: int,
    resume: bool = False,
    console: Console | None = None,
    start_timeout: float = 120.0,
    run_timeout: float | None = None,
    on_started: Callable[[Deployment], None] | None = None,
) -> Deployment:
    """Run the experiment on a SuperLink and ``nodes`` SuperNodes on loopback.

    Args:
        cfg: the experiment (its YAML goes to the ServerApp); None resumes the run in ``out``.
        out: the run directory.
        nodes: SuperNodes to start; node i plays client i (at most ``num_clients``).
        resume: continue the run in ``out`` from its checkpoint.
        console: where progress lines go (the run's own log streams to stdout).
        start_timeout: seconds to wait for the SuperLink to listen.
        run_timeout: seconds ``flwr run`` may take (None: no limit).
        on_started: a callable given the :class:`Deployment` once every process runs
            (tests use it to interrupt or kill nodes).

    Returns:
        The (stopped) deployment, for checks on what it started.

    Raises:
        LorafleetError: a bad config, a process that did not start, or a run that did not
            finish (its log says why).
    """
    console = console or Console(stderr=True)
    out = out.resolve()
    run = RunDir(out)
    stored = run.stored_config() if cfg is None and resume else None
    effective = cfg or stored
    if effective is None:
        raise LorafleetError(f"nothing to resume in {out}; give a CONFIG to start a new run")
    require_federated(effective)
    if not 1 <= nodes <= effective.num_clients:
        raise LorafleetError(f"--nodes must be in 1..num_clients ({effective.num_clients}), "
                             f"got {nodes}: each node plays one client")
    if cfg is not None and not resume and run.holds_run():
        raise LorafleetError(f"{out} already holds a run; pass --resume to continue it, or "
                             "choose another --out")
    home = out / "deploy"
    (home / "flwr-home").mkdir(parents=True, exist_ok=True)
    (home / "app").mkdir(exist_ok=True)
    (home / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
    experiment = home / "experiment.yaml"
    if cfg is not None:
        experiment.write_text(cfg.to_yaml())
    run_config = {
        "config": str(experiment) if cfg is not None else "",
        "out": str(out),
        "resume": "true" if resume else "false",
        "node-wait": repr(float(start_timeout)),
    }
    (home / "run-config.toml").write_text("".join(
        f"{k} = {v if k in ('resume', 'node-wait') else _toml_string(v)}\n"
        for k, v in run_config.items()))

    with _deployment(home) as dep:
        (home / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{dep.port}"\ninsecure = true\n')
        link = dep.start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(dep.port),
            "--database", str(home / "state.db"),
            # The app is lorafleet as installed here: nothing to install per run.
            "--disable-runtime-dependency-installation",
        ])
        _wait_for_port(dep.port, start_timeout, link, "flower-superlink",
                       home / "superlink.log")
        for i in range(nodes):
            dep.start(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{dep.port}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", f"partition-id={i} num-partitions={nodes}",
            ])
        console.print(f"started flower-superlink on 127.0.0.1:{dep.port} and {nodes} "
                      f"flower-supernode(s); logs in {home}", highlight=False)
        if on_started is not None:
            on_started(dep)
        submit = dep.start("flwr-run", [
            "flwr", "run", str(home / "app"), "loopback", "--stream",
            "--run-config", str(home / "run-config.toml"),
        ], log=False)
        try:
            submit.wait(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            raise LorafleetError(f"the run did not finish within {run_timeout:g} s; finished "
                                 f"rounds are kept in {out} (logs in {home})") from None
        dep.descendants()  # note what ran, for the record
    if not run.summary_path.exists():
        raise LorafleetError("the Flower run ended without a summary (its log is above; the "
                             f"nodes' logs are in {home}); finished rounds are kept: --resume")
    return dep
