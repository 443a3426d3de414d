"""Output directories: lorafleet writes only where it may, and removes only what it wrote.

Every directory lorafleet creates for a command (a run directory, a compare or report
directory, an exported model, a Flower app, a deployment's state) gets a small marker file,
``.lorafleet.json``, written first. It names the directory's kind and keeps a manifest: the
files lorafleet writes there (relative paths; ``*`` patterns for a family such as
``checkpoint/state-*.safetensors``; ``sub/`` for a subdirectory with its own marker).

A command writes only into

- a directory that does not exist yet, or an empty one;
- a directory with lorafleet's marker of the right kind, where none of the files it is about
  to write exists unless the manifest lists it (a user's ``results.md`` is never replaced);
- (compatibility) a run directory an earlier lorafleet wrote: a resolved lorafleet
  config.yaml and a metrics.jsonl whose first row is round 0 (a folder that merely holds a
  config.yaml, an adapter/ or a checkpoint/ is not one); a directory holding only such runs
  and report outputs; a Flower app directory as ``lorafleet flower-app`` wrote it; a run's
  ``deploy/``. Claiming one writes the marker, with the files lorafleet knows it wrote.

Anything else is refused before any slow work, in one line that says what is there.
:func:`check_output_dir` is that check (every command calls it first); :func:`claim_output_dir`
checks, creates and marks. :meth:`OutputDir.remove_written` (``compare --overwrite``) removes
what the manifest lists and nothing else.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lorafleet.errors import LorafleetError

__all__ = [
    "APP_ENTRIES",
    "APP_FILES",
    "DEPLOY",
    "EXPORT",
    "FLOWER_APP",
    "MARKER",
    "REPORT_FILES",
    "RESULTS",
    "RUN",
    "RUN_ENTRIES",
    "RUN_FILES",
    "OutputDir",
    "check_output_dir",
    "claim_output_dir",
]

MARKER = ".lorafleet.json"

RUN, RESULTS, EXPORT, FLOWER_APP, DEPLOY = "run", "results", "export", "flower-app", "deploy"
_KIND_WORDS = {
    RUN: "a run directory",
    RESULTS: "a results directory (compare/report)",
    EXPORT: "an exported model",
    FLOWER_APP: "a Flower app directory",
    DEPLOY: "a deployment's directory",
}

# What a run writes (docs/design.md §10), recorded when the run starts.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "partition.json",
             "checkpoint/meta.json", "checkpoint/state-*.safetensors",
             "checkpoint/state-*.safetensors.tmp")
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "summary.json", "partition.json", "checkpoint",
               "adapter", "merged", "deploy")
# What `lorafleet report` (and so `compare`) writes.
REPORT_FILES = ("results.csv", "results.md", "differences.csv", "differences.md",
                "metric_vs_round.png", "metric_vs_bytes.png",
                "metric_vs_sim_time.png", "train_loss_vs_round.png", "client_ranks.png",
                "perplexity_vs_round.png", "perplexity_vs_sim_time.png")
APP_FILES = ("app/pyproject.toml", "experiment.yaml", "run-config.toml")
APP_ENTRIES = ("app", "experiment.yaml", "run-config.toml")
# What PEFT / transformers' save_pretrained wrote into a legacy run's adapter/ and merged/.
_SAVED_MODEL_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md",
                      "config.json", "generation_config.json", "model.safetensors",
                      "model.safetensors.index.json", "model-*-of-*.safetensors")


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _entries(path: Path) -> list[str]:
    return sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())


def _safe(entry: str) -> bool:
    """A manifest entry stays inside its directory (no absolute paths, no ``..``)."""
    pure = PurePosixPath(entry)
    return bool(entry) and not pure.is_absolute() and ".." not in pure.parts


class OutputDir:
    """A directory lorafleet writes into, and its marker (kind + manifest)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    def marker(self) -> dict[str, Any] | None:
        """The marker's content, None if there is none.

        Raises:
            LorafleetError: a marker that is not lorafleet's JSON (edited by hand?).
        """
        if not self.marker_path.is_file():
            return None
        try:
            data = json.loads(self.marker_path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("files", []), list):
                raise ValueError("not a lorafleet marker")
        except (OSError, ValueError) as err:
            raise LorafleetError(f"{self.marker_path} is unreadable ({err}); if {self.path} "
                                 "is yours, remove that file and choose another directory"
                                 ) from None
        return data

    def kind(self) -> str | None:
        """The kind the marker names (None: no marker)."""
        marker = self.marker()
        return None if marker is None else str(marker.get("kind"))

    def written(self) -> list[str]:
        """The manifest: what lorafleet writes here."""
        marker = self.marker()
        return [str(f) for f in (marker or {}).get("files", []) if _safe(str(f))]

    def _write(self, kind: str, files: Iterable[str]) -> None:
        from lorafleet import __version__

        data = {"lorafleet": __version__, "kind": kind, "files": sorted(set(files))}
        tmp = self.path / (MARKER + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, self.marker_path)
        except OSError as err:
            raise LorafleetError(f"cannot write into {self.path}: {err.strerror or err}"
                                 ) from None

    def mark(self, kind: str, files: Iterable[str] = ()) -> None:
        """Write the marker (first thing in a new directory)."""
        self._write(kind, files)

    def record(self, *entries: str) -> None:
        """Add ``entries`` (relative paths, ``*`` patterns, ``sub/``) to the manifest."""
        marker = self.marker()
        if marker is None:
            raise LorafleetError(f"{self.path} was not claimed before writing into it")
        known = self.written()
        if set(entries) <= set(known):
            return
        self._write(str(marker.get("kind")), [*known, *entries])

    def record_tree(self, *subdirs: str) -> None:
        """Record every file now under ``subdirs`` (what save_pretrained just wrote)."""
        files = [str(f.relative_to(self.path)) for sub in subdirs if (self.path / sub).is_dir()
                 for f in sorted((self.path / sub).rglob("*")) if f.is_file()]
        if files:
            self.record(*files)

    def owns(self, name: str) -> bool:
        """Whether the top-level entry ``name`` is lorafleet's (listed, or holds listed files)."""
        for entry in self.written():
            head = PurePosixPath(entry).parts[0]
            if head == name or ("*" in head and PurePosixPath(name).match(head)):
                return True
        return False

    def remove_written(self, only: Iterable[str] | None = None) -> list[str]:
        """Remove the files the manifest lists (with ``only``: those of its entries) and the
        directories that leaves empty; never anything else.

        Without ``only``, a directory left with nothing but the marker is removed too, and
        one that still holds files lorafleet did not write keeps them (and its marker).

        Returns:
            The entries left in the directory (files lorafleet did not write).
        """
        if not self.path.is_dir():
            return []
        keep = None if only is None else set(only)
        root = self.path.resolve()
        parents: set[Path] = set()
        for entry in self.written():
            if keep is not None and entry not in keep:
                continue
            if entry.endswith("/"):
                OutputDir(self.path / entry).remove_written()
                continue
            matches = glob.glob(glob.escape(str(self.path)) + "/" + entry) if "*" in entry \
                else [str(self.path / entry)]
            for match in matches:
                for target in (Path(match), Path(match + ".tmp")):
                    if not (target.is_file() or target.is_symlink()):
                        continue
                    if root not in target.parent.resolve().parents and \
                            target.parent.resolve() != root:
                        continue  # a link out of the directory: not ours to follow
                    target.unlink()
                    parents.update(p for p in target.parents if p != self.path and
                                   self.path in p.parents)
        for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: a user's file inside keeps it
        left = [e for e in _entries(self.path) if e not in (MARKER, MARKER + ".tmp")]
        if only is None:
            if left:
                self._write(self.kind() or RUN, [])  # still ours; the user's files stay
            else:
                self.marker_path.unlink(missing_ok=True)
                self.path.rmdir()
        return left


# ----------------------------------------------------------------------------- legacy dirs
def _is_legacy_run(path: Path) -> bool:
    """A run directory an earlier lorafleet wrote: its resolved config and a round-0 row."""
    from lorafleet.config import ExperimentConfig

    config, metrics = path / "config.yaml", path / "metrics.jsonl"
    if not (config.is_file() and metrics.is_file()):
        return False
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        with metrics.open(encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    fields = set(ExperimentConfig.model_fields)
    return (isinstance(raw, dict) and set(raw) <= fields
            and {"name", "algorithm", "rounds", "seed"} <= set(raw)
            and isinstance(first, dict) and first.get("round") == 0)


def _is_run(path: Path) -> bool:
    kind = OutputDir(path).kind() if (path / MARKER).is_file() else None
    return kind == RUN or (kind is None and _is_legacy_run(path))


def _holds_runs(path: Path) -> bool:
    """A run, or a results directory (marked, or runs and report outputs only)."""
    kind = OutputDir(path).kind() if (path / MARKER).is_file() else None
    if kind is not None:
        return kind in (RUN, RESULTS)
    return _is_legacy_run(path) or _is_legacy_results(path, _entries(path))


def _legacy_run_files(path: Path) -> list[str]:
    files = [f for f in RUN_FILES if "*" in f or (path / f).is_file()]
    for sub in ("adapter", "merged"):
        for pattern in _SAVED_MODEL_FILES:
            files += [f"{sub}/{p.name}" for p in sorted((path / sub).glob(pattern))
                      if p.is_file()]
    files += [f for f in REPORT_FILES if (path / f).is_file()]
    if (path / "deploy").is_dir():
        files.append("deploy/")
    return files


def _is_legacy_results(path: Path, entries: list[str]) -> bool:
    """A directory of runs (or of such directories) and report outputs only (an earlier
    compare's, or a user's folder of runs), at least one of them."""
    runs = [e for e in entries if e.endswith("/") and _holds_runs(path / e.rstrip("/"))]
    rest = [e for e in entries if e not in runs]
    return bool(runs) and all(e in REPORT_FILES for e in rest)


def _is_legacy_app(path: Path, entries: list[str]) -> bool:
    if not set(entries) <= {"app/", "experiment.yaml", "run-config.toml"} or "app/" not in \
            entries:
        return False
    if _entries(path / "app") != ["pyproject.toml"]:
        return False
    try:
        return 'publisher = "lorafleet"' in (path / "app" / "pyproject.toml").read_text()
    except OSError:
        return False


def _legacy(path: Path, kinds: Sequence[str], entries: list[str]
            ) -> tuple[str, list[str]] | None:
    """(kind, files lorafleet wrote) if ``path`` is a legacy directory of one of ``kinds``."""
    if RUN in kinds and _is_legacy_run(path):
        return RUN, _legacy_run_files(path)
    if RESULTS in kinds and _is_legacy_results(path, entries):
        return RESULTS, [e for e in entries if e in REPORT_FILES]
    if FLOWER_APP in kinds and _is_legacy_app(path, entries):
        return FLOWER_APP, [f for f in APP_FILES if (path / f).is_file()]
    if DEPLOY in kinds and path.name == "deploy" and _is_run(path.parent):
        return DEPLOY, list(APP_FILES)
    return None


# ----------------------------------------------------------------------------- the check
def check_output_dir(path: Path | str, kinds: str | Sequence[str], *, option: str = "--out",
                     outputs: Iterable[str] = (), empty_only: bool = False) -> str:
    """Whether a command may write ``outputs`` into ``path``; cheap (no model, no data).

    Args:
        path: the directory.
        kinds: the kind(s) of lorafleet directory the command writes into (the first is
            the kind a new directory gets).
        option: the command's option naming the directory (for the message).
        outputs: top-level names the command writes; one that exists but that lorafleet
            did not write is refused.
        empty_only: refuse any directory that holds something (an export).

    Returns:
        "new" (missing), "empty", "ours" (lorafleet's marker) or "legacy".

    Raises:
        LorafleetError: a file where a directory should be, a directory lorafleet did not
            write (one line saying what is there), or one of another kind.
    """
    path = Path(path)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    want = _KIND_WORDS[kinds[0]]
    if path.exists() and not path.is_dir():
        raise LorafleetError(f"{option} {path} is a file, not a directory; give a new or empty "
                             "directory (or one lorafleet wrote)")
    if not path.exists():
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise LorafleetError(f"{option} {path}: {parent} is a file, not a "
                                         "directory")
                break
        return "new"
    try:
        entries = _entries(path)
    except OSError as err:
        raise LorafleetError(f"{option} {path} cannot be read ({err.strerror or err})"
                             ) from None
    if not entries:
        return "empty"
    out = OutputDir(path)
    kind = out.kind()
    if kind is not None:
        if kind not in kinds:
            raise LorafleetError(f"{option} {path} is {_KIND_WORDS.get(kind, kind)} lorafleet "
                                 f"wrote, not {want}; choose another {option}")
        held = [e for e in entries if e != MARKER]
        if empty_only and held:
            raise LorafleetError(f"{option} {path} is not empty (it holds {_listing(held)}); "
                                 f"choose another {option}")
        foreign = [n for n in outputs if (path / n).exists() and not out.owns(n)]
        if foreign:
            raise LorafleetError(f"{option} {path}: {foreign[0]} is there but lorafleet did "
                                 f"not write it; move it away or choose another {option}")
        return "ours"
    if not empty_only and _legacy(path, kinds, entries) is not None:
        return "legacy"
    raise LorafleetError(
        f"{option} {path} is not empty and lorafleet did not write it (it holds "
        f"{_listing(entries)}); lorafleet writes only into a new or empty directory or one "
        f"it created: choose another {option}")


def claim_output_dir(path: Path | str, kinds: str | Sequence[str], *, option: str = "--out",
                     outputs: Iterable[str] = (), empty_only: bool = False,
                     files: Iterable[str] = ()) -> OutputDir:
    """:func:`check_output_dir`, then create ``path`` and write its marker (adopting a
    legacy directory); ``files`` go into the manifest (what the command is about to write).

    Raises:
        LorafleetError: what :func:`check_output_dir` refuses, or a directory that cannot
            be created.
    """
    path = Path(path)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    outputs = list(outputs)
    status = check_output_dir(path, kinds, option=option, outputs=outputs,
                              empty_only=empty_only)
    out = OutputDir(path)
    if status in ("new", "empty"):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LorafleetError(f"cannot create {option} {path}: {err.strerror or err}"
                                 ) from None
        out.mark(kinds[0], files)
    elif status == "legacy":
        found = _legacy(path, kinds, _entries(path))
        assert found is not None
        out.mark(found[0], [*found[1], *files])
    elif files:
        out.record(*files)
    return out
