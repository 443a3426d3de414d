"""``lorafleet deploy-local``: a real Flower deployment on this machine's loopback.

Starts one ``flower-superlink`` and N ``flower-supernode`` processes (node i plays client
``partition-id = i``), submits the lorafleet app with ``flwr run``, waits for the run to
finish and stops every process it started, their children included (also on Ctrl-C, an
error, or a SuperLink that dies mid-run).

Without :class:`Security` the processes talk plain HTTP (``--insecure``). With a TLS
directory the SuperLink serves HTTPS with its certificate and every client (SuperNodes,
``flwr``) checks it against the CA; with SuperNode keys as well, the SuperLink runs with
``--enable-supernode-auth``, each node's public key is registered through the Control API
(``flwr supernode register``) and each node signs its requests with its private key
(``--auth-supernode-private-key``): a node whose key is not registered cannot join. These
are the flags a deployment across machines uses (Flower 1.41 allows authentication only over
TLS).

Everything Flower keeps lives under ``OUT/deploy/``: ``flwr-home/`` (the ``flwr`` CLI's
config and installed apps), ``state.db`` (the SuperLink's state, started afresh by every
``deploy-local``: a resumed run continues from the run directory's checkpoint), one log per
process, ``app/`` (a minimal Flower app naming lorafleet's installed ServerApp and
ClientApp), and ``run-config.toml``. The run directory itself is OUT, as with
``lorafleet run``.

Each message runs in a fresh ``flwr-clientapp`` process on the SuperNode (Flower 1.41's
Deployment Engine). By default every node therefore gets a **resident trainer** beside its
SuperNode (``lorafleet node --partition-id i --socket ... --config ...``, logs in
``trainer-<i>.log``), which builds the experiment once, before the run is submitted, and
trains every round the node's thin ClientApp forwards to it (node config
``trainer-socket``). The sockets live in a private temporary directory (mode 0700, removed
at the end: a Unix socket path has at most 107 bytes, which a deep ``OUT`` would exceed).
``resident=False`` (``--no-resident``) is the previous mode: each ClientApp process builds
the experiment itself, once per message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
from rich.console import Console

from lorafleet.config import ExperimentConfig
from lorafleet.errors import LorafleetError
from lorafleet.outdir import (
    APP_ENTRIES,
    APP_FILES,
    DEPLOY,
    FLOWER_APP,
    RUN,
    RUN_ENTRIES,
    OutputDir,
    check_output_dir,
    claim_output_dir,
)
from lorafleet.rundir import RunDir
from lorafleet.runtimes.flower.server_app import require_federated

__all__ = ["Deployment", "Security", "deploy_local", "write_app"]

log = logging.getLogger("lorafleet")

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


def write_app(home: Path, cfg: ExperimentConfig | None, out: Path, *, resume: bool = False,
              round_timeout: float = 3600.0, node_wait: float = 120.0) -> Path:
    """Write what ``flwr run`` needs to run an experiment on lorafleet's installed app.

    ``home/app/pyproject.toml`` (a Flower app naming lorafleet's ServerApp and ClientApp: the
    FAB carries no code, every machine runs its installed lorafleet),
    ``home/experiment.yaml`` (the resolved config; not written when ``cfg`` is None, i.e.
    resuming) and ``home/run-config.toml`` (where the ServerApp reads it and writes the run
    directory ``out``: paths on the SuperLink's machine).

    Returns:
        The run-config file (``flwr run HOME/app CONNECTION --run-config`` it).

    Raises:
        LorafleetError: a round timeout that is not positive, a negative node wait, or a
            ``home`` or ``out`` lorafleet may not write into (:mod:`lorafleet.outdir`;
            nothing is written).
    """
    if round_timeout <= 0:
        raise LorafleetError(f"--round-timeout must be positive, got {round_timeout:g}")
    if node_wait < 0:
        raise LorafleetError(f"--node-wait must be >= 0, got {node_wait:g}")
    check_output_dir(out, RUN, outputs=RUN_ENTRIES)  # the ServerApp's run directory
    claim_output_dir(home, (FLOWER_APP, DEPLOY), option="--app", outputs=APP_ENTRIES,
                     files=APP_FILES)
    home = home.resolve()
    (home / "app").mkdir(parents=True, exist_ok=True)
    (home / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
    experiment = home / "experiment.yaml"
    if cfg is not None:
        experiment.write_text(cfg.to_yaml())
    strings = {"config": str(experiment) if cfg is not None else "", "out": str(out.resolve())}
    numbers = {"resume": "true" if resume else "false",
               "round-timeout": repr(float(round_timeout)),
               "node-wait": repr(float(node_wait))}
    run_config = home / "run-config.toml"
    run_config.write_text(
        "".join(f"{k} = {_toml_string(v)}\n" for k, v in strings.items())
        + "".join(f"{k} = {v}\n" for k, v in numbers.items()))
    return run_config


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


@dataclass(frozen=True)
class Security:
    """TLS certificates and SuperNode keys of a deployment (neither: plain HTTP).

    Attributes:
        tls_dir: holds ``ca.crt`` (the CA that signed the server certificate),
            ``server.pem`` (the SuperLink's certificate; its SANs must name the address
            the nodes dial, here 127.0.0.1) and ``server.key`` (its private key): the file
            names of Flower's TLS guide.
        auth_dir: holds, for each node i, ``supernode-<i>`` (an EC private key on a NIST
            curve in OpenSSH format, e.g. ``ssh-keygen -t ecdsa -b 384 -N "" -f
            supernode-0``) and ``supernode-<i>.pub``; needs ``tls_dir``.
    """

    tls_dir: Path | None = None
    auth_dir: Path | None = None

    CA = "ca.crt"
    CERT = "server.pem"
    KEY = "server.key"

    @property
    def insecure(self) -> bool:
        """Whether the deployment runs without TLS."""
        return self.tls_dir is None

    def file(self, name: str) -> Path:
        """``name`` in the TLS directory, as an absolute path (the processes' cwd differs)."""
        if self.tls_dir is None:
            raise LorafleetError("no TLS directory given")
        return (self.tls_dir / name).resolve()

    def node_key(self, partition: int) -> Path | None:
        """Node ``partition``'s private key (its public key is this path + ``.pub``)."""
        if self.auth_dir is None:
            return None
        return (self.auth_dir / f"supernode-{partition}").resolve()

    def check(self, nodes: int) -> None:
        """Refuse missing files, and authentication without TLS, in one line."""
        if self.auth_dir is not None and self.tls_dir is None:
            raise LorafleetError("SuperNode authentication needs TLS: give --tls-dir too "
                                 "(Flower 1.41 refuses --enable-supernode-auth without it)")
        wanted: list[Path] = []
        if self.tls_dir is not None:
            wanted += [self.file(n) for n in (self.CA, self.CERT, self.KEY)]
        for i in range(nodes if self.auth_dir is not None else 0):
            key = self.node_key(i)
            assert key is not None
            wanted += [key, key.with_name(key.name + ".pub")]
        missing = [str(f) for f in wanted if not f.is_file()]
        if missing:
            raise LorafleetError(f"missing certificate or key files: {', '.join(missing)} "
                                 "(--tls-dir holds ca.crt, server.pem, server.key; --auth-keys "
                                 "holds supernode-<i> and supernode-<i>.pub for every node i)")

    def superlink_args(self) -> list[str]:
        """``flower-superlink``'s transport flags."""
        if self.insecure:
            return ["--insecure"]
        args = ["--ssl-ca-certfile", str(self.file(self.CA)),
                "--ssl-certfile", str(self.file(self.CERT)),
                "--ssl-keyfile", str(self.file(self.KEY))]
        return args + (["--enable-supernode-auth"] if self.auth_dir is not None else [])

    def supernode_args(self, key: Path | None) -> list[str]:
        """``flower-supernode``'s transport flags, signing with ``key`` when given."""
        if self.insecure:
            return ["--insecure"]
        args = ["--root-certificates", str(self.file(self.CA))]
        return args + (["--auth-supernode-private-key", str(key)] if key is not None else [])

    def connection(self, port: int) -> str:
        """The ``flwr`` CLI's config.toml: a connection named ``loopback``."""
        trust = ("insecure = true" if self.insecure
                 else f"root-certificates = {_toml_string(str(self.file(self.CA)))}")
        return (f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                f'address = "127.0.0.1:{port}"\n{trust}\n')


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Deployment:
    """The processes of a loopback deployment; :meth:`stop` ends all of them.

    Attributes:
        home: ``OUT/deploy``.
        port: the SuperLink's port (Fleet, Control and ServerAppIo APIs).
        nodes: SuperNodes of the fleet (``num-partitions`` in their node config).
        security: TLS and SuperNode keys (default: none, plain HTTP).
        node_data: node -> its own data file (``data-path`` in its node config, or the
            resident trainer's ``--data-path``), for nodes that do not train on their
            partition of the experiment's dataset.
        trainer_dir: where the resident trainers' sockets are (None: no resident trainers,
            each ClientApp trains in its own process).
        trainer_config: the experiment file the resident trainers build before the run.
        procs: (name, process) for every process started, in start order.
        seen: ids of every process known to belong to the deployment (with descendants
            found while it ran), for checks that nothing is left behind.
    """

    home: Path
    port: int
    nodes: int = 1
    security: Security = field(default_factory=Security)
    node_data: dict[int, Path] = field(default_factory=dict)
    trainer_dir: Path | None = None
    trainer_config: Path | None = None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    _tracked: dict[int, psutil.Process] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    # Tests start and kill nodes from another thread while deploy_local watches the run.
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _stopped: bool = False
    _reported: set[int] = field(default_factory=set)

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
        with self._lock:
            if self._stopped:
                raise LorafleetError(f"the deployment in {self.home} is stopped; not starting "
                                     f"{name}")
            out: IO[bytes] | None = None
            if log:
                out = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed by stop()
                self._logs.append(out)
            proc = subprocess.Popen(args, stdout=out,
                                    stderr=subprocess.STDOUT if log else None,
                                    env=self.env, cwd=self.home, start_new_session=True)
            self.procs.append((name, proc))
            self.seen.add(proc.pid)
            with contextlib.suppress(psutil.Error):
                self._tracked[proc.pid] = psutil.Process(proc.pid)
            return proc

    def start_supernode(self, partition: int, *, key: Path | None = None,
                        name: str | None = None) -> subprocess.Popen[bytes]:
        """Start a ``flower-supernode`` playing client ``partition``.

        Args:
            partition: its ``partition-id``.
            key: the private key it signs with (default: the deployment's key for
                ``partition``, if it authenticates nodes).
            name: its name in :attr:`procs` and its log's (default ``supernode-<i>``).
        """
        key = key if key is not None else self.security.node_key(partition)
        node_config = f"partition-id={partition} num-partitions={self.nodes}"
        if self.trainer_dir is not None:  # its resident trainer holds the data
            node_config += f" trainer-socket={_toml_string(str(self.trainer_socket(partition)))}"
        elif partition in self.node_data:
            node_config += f" data-path={_toml_string(str(self.node_data[partition].resolve()))}"
        return self.start(name or f"supernode-{partition}", [
            "flower-supernode", *self.security.supernode_args(key),
            "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(_free_port()),
            "--node-config", node_config,
        ])

    def trainer_socket(self, partition: int) -> Path:
        """The socket of node ``partition``'s resident trainer."""
        if self.trainer_dir is None:
            raise LorafleetError("this deployment runs no resident trainers")
        return self.trainer_dir / f"node-{partition}.sock"

    def start_trainer(self, partition: int, *, name: str | None = None
                      ) -> subprocess.Popen[bytes]:
        """Start node ``partition``'s resident trainer (``lorafleet node``), which builds
        :attr:`trainer_config` before it listens (see :meth:`wait_for_trainer`)."""
        args = [sys.executable, "-m", "lorafleet", "node", "--partition-id", str(partition),
                "--socket", str(self.trainer_socket(partition))]
        if self.trainer_config is not None:
            args += ["--config", str(self.trainer_config)]
        if partition in self.node_data:
            args += ["--data-path", str(self.node_data[partition].resolve())]
        return self.start(name or f"trainer-{partition}", args)

    def wait_for_trainer(self, partition: int, timeout: float, *, name: str | None = None
                         ) -> None:
        """Wait until node ``partition``'s resident trainer answers on its socket.

        Raises:
            LorafleetError: it exited, or did not answer within ``timeout`` seconds.
        """
        from lorafleet.runtimes.flower.link import LinkError
        from lorafleet.runtimes.flower.node import ping

        name = name or f"trainer-{partition}"
        proc, log_path = self.process(name), self.home / f"{name}.log"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LorafleetError(f"the resident trainer of node {partition} exited with "
                                     f"status {proc.returncode} while starting; see {log_path}")
            with contextlib.suppress(LinkError):
                ping(self.trainer_socket(partition), timeout=5.0)
                return
            if time.monotonic() >= deadline:
                raise LorafleetError(f"the resident trainer of node {partition} did not listen "
                                     f"within {timeout:g} s; see {log_path}")
            time.sleep(0.3)

    def report_dead_trainers(self) -> None:
        """Log, once each, resident trainers that exited while the run goes on (their node's
        rounds fail, with that reason, until they are restarted)."""
        with self._lock:
            for name, proc in self.procs:
                if name.startswith("trainer-") and proc.poll() is not None \
                        and proc.pid not in self._reported and not self._stopped:
                    self._reported.add(proc.pid)
                    log.warning("%s exited with status %s during the run; its node is dropped "
                                "from rounds until it is restarted (see %s)", name,
                                proc.returncode, self.home / f"{name}.log")

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """The process last started under ``name``."""
        for started, proc in reversed(self.procs):
            if started == name:
                return proc
        raise KeyError(name)

    def descendants(self) -> list[psutil.Process]:
        """Every live process the deployment started, children of children included
        (also those whose parent has died, once seen here)."""
        with self._lock:
            found: dict[int, psutil.Process] = {}
            for _, proc in self.procs:
                with contextlib.suppress(psutil.Error):
                    root = self._tracked.get(proc.pid) or psutil.Process(proc.pid)
                    if _alive(root):
                        for p in [root, *root.children(recursive=True)]:
                            found[p.pid] = p
            for p in found.values():
                self._tracked.setdefault(p.pid, p)
            self.seen.update(found)
            # A process seen earlier whose parent died (killed) is still the deployment's.
            return [p for p in self._tracked.values() if _alive(p)]

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` and all its descendants at once, as a crash of
        its machine would (tests use it)."""
        with self._lock:
            root = self._tracked.get(self.process(name).pid)
            if root is None or not _alive(root):
                return
            victims = [root]
            with contextlib.suppress(psutil.Error):
                victims += root.children(recursive=True)
            for p in victims:
                self._tracked.setdefault(p.pid, p)
                self.seen.add(p.pid)
            for p in victims:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        # Reap the process we started first, so that its Popen keeps the status (-9);
        # reaped by psutil, Popen would report 0.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process(name).wait(timeout=5.0)
        psutil.wait_procs(victims, timeout=5.0)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate every process (SIGTERM, then SIGKILL after ``timeout``) and reap them."""
        with self._lock:
            self._stopped = True
            alive = self.descendants()
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        # Reap the processes started here through their Popen first, so that their exit
        # status is kept (psutil would reap them and leave Popen a made-up 0).
        deadline = time.monotonic() + timeout
        for _, proc in list(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        _, alive = psutil.wait_procs(alive, timeout=max(0.0, deadline - time.monotonic()))
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5.0)
        with self._lock:
            for _, proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
            for log in self._logs:
                log.close()
            self._logs.clear()


@contextlib.contextmanager
def _deployment(home: Path, nodes: int, security: Security, node_data: dict[int, Path],
                trainer_config: Path | None) -> Iterator[Deployment]:
    """A deployment that is stopped at exit; with ``trainer_config``, its resident trainers'
    private socket directory is made (mode 0700) and removed with it."""
    trainer_dir = (Path(tempfile.mkdtemp(prefix="lorafleet-"))
                   if trainer_config is not None else None)
    dep = Deployment(home=home, port=_free_port(), nodes=nodes, security=security,
                     node_data=node_data, trainer_dir=trainer_dir,
                     trainer_config=trainer_config)
    try:
        yield dep
    finally:
        try:
            dep.stop()
        finally:
            if trainer_dir is not None:
                shutil.rmtree(trainer_dir, ignore_errors=True)


def _register_nodes(dep: Deployment) -> None:
    """Register every node's public key with the SuperLink (``flwr supernode register``)."""
    for i in range(dep.nodes):
        key = dep.security.node_key(i)
        assert key is not None
        done = subprocess.run(
            ["flwr", "supernode", "register", str(key) + ".pub", "loopback"],
            env=dep.env, cwd=dep.home, capture_output=True, text=True, timeout=120,
            check=False)
        with open(dep.home / "register.log", "a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise LorafleetError(f"flwr supernode register {key}.pub failed "
                                 f"({lines[-1] if lines else done.returncode}); see "
                                 f"{dep.home / 'register.log'}")


def deploy_local(
    cfg: ExperimentConfig | None,
    out: Path,
    *,
    nodes: int,
    resume: bool = False,
    security: Security | None = None,
    node_data: dict[int, Path] | None = None,
    round_timeout: float = 3600.0,
    node_wait: float | None = None,
    console: Console | None = None,
    start_timeout: float = 120.0,
    run_timeout: float | None = None,
    on_started: Callable[[Deployment], None] | None = None,
    resident: bool = True,
    trainer_timeout: float = 600.0,
) -> Deployment:
    """Run the experiment on a SuperLink and ``nodes`` SuperNodes on loopback.

    Args:
        cfg: the experiment (its YAML goes to the ServerApp); None resumes the run in ``out``.
        out: the run directory.
        nodes: SuperNodes to start; node i plays client i (at most ``num_clients``).
        resume: continue the run in ``out`` from its checkpoint.
        security: TLS certificates and SuperNode keys (default: plain HTTP).
        node_data: node -> a data file it trains on instead of its partition (its
            ``data-path``); the file must exist.
        round_timeout: seconds a round waits for its nodes' replies; a node that has not
            answered by then (killed, disconnected, too slow) is dropped from the round.
        node_wait: seconds the server waits, before round 1, for every client's node
            (default ``start_timeout``).
        console: where progress lines go (the run's own log streams to stdout).
        start_timeout: seconds to wait for the SuperLink to listen.
        run_timeout: seconds ``flwr run`` may take (None: no limit).
        on_started: a callable given the :class:`Deployment` once every process runs
            (tests use it to interrupt, kill or add nodes).
        resident: start a resident trainer beside each SuperNode (default); False: the
            previous mode, each ClientApp builds the experiment itself, once per message.
        trainer_timeout: seconds each resident trainer may take to build the experiment
            and listen (they build at the same time, while the SuperLink starts).

    Returns:
        The (stopped) deployment, for checks on what it started.

    Raises:
        LorafleetError: a bad config, missing certificates or keys, a process that did not
            start, a SuperLink that died, or a run that did not finish (its log says why).
    """
    console = console or Console(stderr=True)
    security = security or Security()
    out = out.resolve()
    run = RunDir(out)
    run.check()  # a file, or a directory that is not a run's: refused before anything
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
    security.check(nodes)
    for node, path in (node_data or {}).items():
        if not 0 <= node < nodes:
            raise LorafleetError(f"--node-data {node}=...: node {node} is not started "
                                 f"(nodes 0..{nodes - 1})")
        if not path.exists():
            raise LorafleetError(f"--node-data {node}={path}: no such file")
    home = out / "deploy"
    check_output_dir(home, DEPLOY)
    run.claim()  # the ServerApp starts the run in it; Flower's state goes to OUT/deploy
    OutputDir(out).record("deploy/")
    claim_output_dir(home, DEPLOY, files=["flwr-home/config.toml", "state.db*", "*.log"])
    write_app(home, cfg, out, resume=resume, round_timeout=round_timeout,
              node_wait=start_timeout if node_wait is None else node_wait)
    (home / "flwr-home").mkdir(parents=True, exist_ok=True)
    # Flower's state is this deployment's only (registered keys, runs): start it afresh.
    for db in home.glob("state.db*"):
        db.unlink()

    # The resident trainers build the experiment the ServerApp will run (a resumed run's
    # stored config when no new one is given).
    trainer_config = (None if not resident
                      else home / "experiment.yaml" if cfg is not None else run.config_path)
    with _deployment(home, nodes, security, dict(node_data or {}), trainer_config) as dep:
        (home / "flwr-home" / "config.toml").write_text(security.connection(dep.port))
        link = dep.start("superlink", [
            "flower-superlink", *security.superlink_args(),
            "--host", "127.0.0.1", "--port", str(dep.port),
            "--database", str(home / "state.db"),
            # The app is lorafleet as installed here: nothing to install per run.
            "--disable-runtime-dependency-installation",
        ])
        if resident:  # they load the model while the SuperLink starts
            for i in range(nodes):
                dep.start_trainer(i)
        _wait_for_port(dep.port, start_timeout, link, "flower-superlink",
                       home / "superlink.log")
        if security.auth_dir is not None:
            _register_nodes(dep)
        if resident:
            for i in range(nodes):
                dep.wait_for_trainer(i, trainer_timeout)
        for i in range(nodes):
            dep.start_supernode(i)
        mode = ("TLS, SuperNode authentication" if security.auth_dir is not None
                else "TLS" if not security.insecure else "insecure")
        trainers = " (each with a resident trainer)" if resident else ""
        console.print(f"started flower-superlink on 127.0.0.1:{dep.port} ({mode}) and "
                      f"{nodes} flower-supernode(s){trainers}; logs in {home}",
                      highlight=False)
        if on_started is not None:
            on_started(dep)
        submit = dep.start("flwr-run", [
            "flwr", "run", str(home / "app"), "loopback", "--stream",
            "--run-config", str(home / "run-config.toml"),
        ], log=False)
        _wait_for_run(dep, submit, link, run_timeout, out)
    if not run.summary_path.exists():
        raise LorafleetError("the Flower run ended without a summary (its log is above; the "
                             f"nodes' logs are in {home}); finished rounds are kept: --resume")
    return dep


def _wait_for_run(dep: Deployment, submit: subprocess.Popen[bytes],
                  link: subprocess.Popen[bytes], run_timeout: float | None, out: Path) -> None:
    """Wait for ``flwr run`` to end, noting the deployment's processes as they come (a
    ClientApp lives for one message); stop early if the SuperLink dies."""
    deadline = None if run_timeout is None else time.monotonic() + run_timeout
    while True:
        try:
            submit.wait(timeout=0.5)
            return
        except subprocess.TimeoutExpired:
            pass
        dep.descendants()
        dep.report_dead_trainers()
        if link.poll() is not None:
            raise LorafleetError(
                f"flower-superlink exited with status {link.returncode} during the run (see "
                f"{dep.home / 'superlink.log'}); finished rounds are kept in {out}: --resume")
        if deadline is not None and time.monotonic() >= deadline:
            raise LorafleetError(f"the run did not finish within {run_timeout:g} s; finished "
                                 f"rounds are kept in {out} (logs in {dep.home})")
