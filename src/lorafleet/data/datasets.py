"""Text datasets: the embedded defaults (DESIGN section 5) and any `datasets` source.

Every source becomes one :class:`TextDataset`: a list of ``(text, label id)`` examples and
the label names (empty for unlabeled text). Loading is deterministic in the seed.
"""

from __future__ import annotations

import bz2
import csv
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafleet.assets import get_asset, package_dir
from lorafleet.config import DataConfig
from lorafleet.errors import ConfigError

__all__ = [
    "EMBEDDED_DATASETS",
    "Example",
    "TextDataset",
    "load_text_dataset",
    "train_eval_split",
]

_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Hamlet is cut into chunks of consecutive lines of about this many characters.
_CHUNK_MIN_CHARS = 400
_CHUNK_MAX_CHARS = 600


@dataclass(frozen=True)
class Example:
    """One text and its class id (``None`` for unlabeled text)."""

    text: str
    label: int | None = None


@dataclass
class TextDataset:
    """A named list of examples; ``label_names[i]`` names class id ``i``."""

    name: str
    examples: list[Example]
    label_names: list[str]

    @property
    def labeled(self) -> bool:
        """Whether examples carry class ids."""
        return bool(self.label_names)

    def labels(self) -> list[int] | None:
        """The class id of every example, or ``None`` for unlabeled data."""
        if not self.labeled:
            return None
        return [int(e.label) for e in self.examples if e.label is not None]


def _labeled(pairs: Sequence[tuple[str, str]]) -> tuple[list[Example], list[str]]:
    """``(text, label name)`` pairs -> examples with ids into sorted label names."""
    names = sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(names)}
    return [Example(text, index[label]) for text, label in pairs], names


def _dedupe(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop exact duplicate texts, keeping the first occurrence."""
    seen: set[str] = set()
    out = []
    for text, label in pairs:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is latin-1
        return data.decode("latin-1")


def _load_bbc_news() -> tuple[list[Example], list[str]]:
    root = package_dir(get_asset("bbc-news")) / "bbcnews" / "data"
    pairs = [(_read_text(path).strip(), path.parent.name) for path in sorted(root.glob("*/*.txt"))]
    return _labeled(_dedupe([(t, lab) for t, lab in pairs if t]))


def _load_rotten_tomatoes() -> tuple[list[Example], list[str]]:
    # Columns: category (fresh / rotten / plot), filename, text, movie_name. The 156
    # "plot" rows are plot summaries, not reviews, so the sentiment task drops them.
    path = package_dir(get_asset("rotten-tomatoes")) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = [
        (row["text"].strip(), row["category"])
        for row in rows
        if row["category"] in ("fresh", "rotten") and row["text"].strip()
    ]
    return _labeled(_dedupe(pairs))


def _chunk_lines(lines: Sequence[str]) -> list[str]:
    """Join consecutive non-blank lines into chunks of ~400-600 characters."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        line = line.rstrip()
        if not line.strip():
            continue
        if current and size >= _CHUNK_MIN_CHARS and size + 1 + len(line) > _CHUNK_MAX_CHARS:
            chunks.append("\n".join(current))
            current, size = [], 0
        size += len(line) + (1 if current else 0)
        current.append(line)
    if current:
        chunks.append("\n".join(current))
    return chunks


def _load_hamlet() -> tuple[list[Example], list[str]]:
    path = package_dir(get_asset("hamlet")) / "data" / "hamlet.txt"
    lines = _read_text(path).splitlines()
    return [Example(chunk) for chunk in _chunk_lines(lines)], []


def _load_dialogue() -> tuple[list[Example], list[str]]:
    # One YAML file per topic with key `conversations`: a list of turn lists.
    root = package_dir(get_asset("dialogue")) / "data" / "english"
    pairs = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations") or []:
            text = "\n".join(str(t).strip() for t in turns if t is not None).strip()
            if text:
                pairs.append((text, path.stem))
    return _labeled(_dedupe(pairs))


EMBEDDED_DATASETS: dict[str, Callable[[], tuple[list[Example], list[str]]]] = {
    "bbc-news": _load_bbc_news,
    "rotten-tomatoes": _load_rotten_tomatoes,
    "hamlet": _load_hamlet,
    "dialogue": _load_dialogue,
}


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or Path(name).suffix.lower() in _FILE_BUILDERS
        or Path(name).expanduser().exists()
    )


def _open_hf(cfg: DataConfig) -> Any:
    """Open ``data.dataset`` as a ``datasets.Dataset`` (local file, saved dir or hub)."""
    import datasets

    name = cfg.dataset
    path = Path(name).expanduser()
    if _looks_like_path(name):
        if path.is_dir():
            try:
                loaded = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(
                    "data.dataset", f"{path} is not a saved `datasets` dataset ({err})"
                ) from None
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise ConfigError(
                        "data.split",
                        f"split '{cfg.split}' not in {path} (splits: {', '.join(loaded)})",
                    )
                loaded = loaded[cfg.split]
            return loaded
        if not path.is_file():
            raise ConfigError("data.dataset", f"no such file or directory: {path}")
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            allowed = ", ".join(sorted(_FILE_BUILDERS))
            raise ConfigError(
                "data.dataset", f"unsupported file type '{path.suffix}' (allowed: {allowed})"
            )
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # pyarrow and datasets raise many kinds on bad files
            raise ConfigError("data.dataset", f"could not read {path}: {err}") from None
    try:
        return datasets.load_dataset(name, split=cfg.split)
    except Exception:  # offline, unknown name, bad split: all one answer for the user
        embedded = ", ".join(EMBEDDED_DATASETS)
        raise ConfigError(
            "data.dataset",
            f"unknown dataset '{name}': not an embedded dataset ({embedded}), not a local "
            f"file or directory, and split '{cfg.split}' could not be loaded from the "
            "Hugging Face hub (offline?)",
        ) from None


def _sort_key(value: Any) -> tuple[int, Any]:
    """Sort label values numerically when they are numbers (also "10" after "9")."""
    if isinstance(value, bool):
        return (1, str(value))
    if isinstance(value, int | float):
        return (0, value)
    text = str(value)
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def _from_hf(ds: Any, cfg: DataConfig) -> tuple[list[Example], list[str]]:
    import datasets

    columns = list(ds.column_names)
    if cfg.text_field not in columns:
        raise ConfigError(
            "data.text_field",
            f"column '{cfg.text_field}' not found (columns: {', '.join(columns)})",
        )
    texts = ds[cfg.text_field]
    if cfg.label_field not in columns:
        # A missing label column means unlabeled text, unless the user asked for it.
        if "label_field" in cfg.model_fields_set:
            raise ConfigError(
                "data.label_field",
                f"column '{cfg.label_field}' not found (columns: {', '.join(columns)})",
            )
        return [Example(str(t)) for t in texts if t is not None and str(t).strip()], []

    raw = ds[cfg.label_field]
    feature = ds.features.get(cfg.label_field)
    if isinstance(feature, datasets.ClassLabel):
        # Keep the dataset's own ids and names; -1 marks an unlabeled row.
        names = [str(n) for n in feature.names]
        examples = [
            Example(str(t), int(y))
            for t, y in zip(texts, raw, strict=True)
            if t is not None and str(t).strip() and y is not None and 0 <= int(y) < len(names)
        ]
        return examples, names
    rows = [
        (str(t), y)
        for t, y in zip(texts, raw, strict=True)
        if t is not None and str(t).strip() and y is not None and str(y) != ""
    ]
    values = sorted({y for _, y in rows}, key=_sort_key)
    index = {v: i for i, v in enumerate(values)}
    return [Example(t, index[y]) for t, y in rows], [str(v) for v in values]


def load_text_dataset(cfg: DataConfig, seed: int) -> TextDataset:
    """Load ``data.dataset`` as a :class:`TextDataset`.

    Embedded: ``bbc-news`` (5 topics, exact duplicates dropped), ``rotten-tomatoes``
    (fresh / rotten review snippets), ``hamlet`` (unlabeled ~500-character chunks),
    ``dialogue`` (ChatterBot conversations labeled by topic). Otherwise a local
    .csv/.json/.jsonl/.parquet file, a dir saved with ``save_to_disk``, or a hub name
    (split ``data.split``), reading columns ``data.text_field`` and ``data.label_field``.
    String or numeric labels become ids into their sorted names; a ``ClassLabel`` keeps its
    own names; no label column means unlabeled text. ``data.max_examples`` keeps a seeded
    random subset (in the source's order).

    Raises:
        ConfigError: missing file or column, unknown dataset, or no examples.
    """
    loader = EMBEDDED_DATASETS.get(cfg.dataset)
    if loader is not None:
        examples, label_names = loader()
    else:
        examples, label_names = _from_hf(_open_hf(cfg), cfg)
    if not examples:
        raise ConfigError("data.dataset", f"'{cfg.dataset}' holds no non-empty examples")
    if cfg.max_examples is not None and cfg.max_examples < len(examples):
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        examples = [examples[i] for i in sorted(order[: cfg.max_examples])]
    return TextDataset(name=cfg.dataset, examples=examples, label_names=label_names)


def train_eval_split(
    dataset: TextDataset, eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval), stratified by label when labeled; both lists shuffled.

    The eval set holds ``round(n * eval_fraction)`` examples (at least 1, at most n - 1);
    per label it holds that label's share, rounded by largest remainder.

    Raises:
        ConfigError: fewer than 2 examples.
    """
    n = len(dataset.examples)
    if n < 2:
        raise ConfigError(
            "data.max_examples", f"need at least 2 examples to hold some out, got {n}"
        )
    rng = random.Random(seed)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    groups: dict[int | None, list[int]] = defaultdict(list)
    for i, example in enumerate(dataset.examples):
        groups[example.label if dataset.labeled else None].append(i)
    keys = sorted(groups, key=lambda k: -1 if k is None else k)
    # Largest-remainder quotas so the per-label counts add up to n_eval exactly.
    shares = {k: len(groups[k]) * n_eval / n for k in keys}
    quota = {k: int(shares[k]) for k in keys}
    by_remainder = sorted(keys, key=lambda k: (-(shares[k] - quota[k]), -1 if k is None else k))
    for k in by_remainder[: n_eval - sum(quota.values())]:
        quota[k] += 1
    train_idx: list[int] = []
    eval_idx: list[int] = []
    for k in keys:
        idx = groups[k][:]
        rng.shuffle(idx)
        eval_idx += idx[: quota[k]]
        train_idx += idx[quota[k] :]
    rng.shuffle(train_idx)
    rng.shuffle(eval_idx)
    return [dataset.examples[i] for i in train_idx], [dataset.examples[i] for i in eval_idx]
