"""The run directory contract (docs/design.md §10): what every runtime leaves behind.

``config.yaml`` (resolved config), ``metrics.jsonl`` (one object per round, round 0 is the
initial model's evaluation), ``summary.json``, ``partition.json``, ``adapter/`` or
``merged/``, ``checkpoint/``, and lorafleet's marker ``.lorafleet.json`` (written first,
:mod:`lorafleet.outdir`): a run writes only into a directory that is new, empty or a run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorafleet.config import ExperimentConfig, read_config_file, validate_config
from lorafleet.errors import LorafleetError
from lorafleet.outdir import (
    RUN,
    RUN_ENTRIES,
    RUN_FILES,
    OutputDir,
    check_output_dir,
    claim_output_dir,
)

__all__ = ["RunDir"]


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    def check(self) -> None:
        """Refuse, before anything slow, a directory a run must not write into."""
        check_output_dir(self.path, RUN, outputs=RUN_ENTRIES)

    def claim(self) -> None:
        """Mark the directory as a run's (creating it), after :meth:`check`'s test."""
        claim_output_dir(self.path, RUN, outputs=RUN_ENTRIES, files=RUN_FILES)

    def record_outputs(self, *subdirs: str) -> None:
        """Add the files now under ``subdirs`` (the exported model) to the manifest."""
        out = OutputDir(self.path)
        if out.marker() is not None:
            out.record_tree(*subdirs)

    def holds_run(self) -> bool:
        """True if a run has already written here."""
        return self.metrics_path.exists() or self.summary_path.exists()

    def prepare_new(self, cfg: ExperimentConfig) -> None:
        """Start a fresh run here; refuses to overwrite an earlier run's results."""
        if self.holds_run():
            raise LorafleetError(
                f"{self.path} already holds a run; pass --resume to continue it, "
                "or choose another --out"
            )
        self.claim()
        self.config_path.write_text(cfg.to_yaml())
        self.metrics_path.write_text("")

    def stored_config(self) -> ExperimentConfig:
        """The resolved config a previous run stored here."""
        if not self.config_path.is_file():
            raise LorafleetError(f"{self.path} holds no config.yaml to resume from")
        return validate_config(read_config_file(self.config_path))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one round's metrics and flush them to disk."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric rows (a torn last line from a kill is skipped)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only rows of rounds <= ``last_round`` (what the checkpoint covers)."""
        rows = [r for r in self.read_metrics() if int(r["round"]) <= last_round]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)
        return rows

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` (JSON) atomically."""
        tmp = self.path / (name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path / name)
