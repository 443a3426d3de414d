"""Text datasets: the embedded defaults (docs/design.md §8) and any `datasets` source.

Every source becomes one :class:`TextDataset`: a list of ``(text, label id, target)``
examples and the label names (empty for unlabeled text); ``target`` is the reference output
of a generation task (``None`` when the source has none). Loading is deterministic in the seed.
"""

from __future__ import annotations

import bz2
import csv
import logging
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

log = logging.getLogger("lorafleet")

_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# DataConfig fields an embedded dataset does not read (its columns are fixed).
_SOURCE_FIELDS = ("text_field", "label_field", "target_field", "split")

# Hamlet is cut into chunks of consecutive lines of about this many characters.
_CHUNK_MIN_CHARS = 400
_CHUNK_MAX_CHARS = 600


@dataclass(frozen=True)
class Example:
    """One text, its class id (``None`` for unlabeled text) and its generation target;
    ``messages`` holds an instruction example's conversation as ``(role, content)`` turns
    (``lorafleet.data.instructions``; ``None`` for plain text)."""

    text: str
    label: int | None = None
    target: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


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

    @property
    def has_targets(self) -> bool:
        """Whether every example carries a generation target."""
        return bool(self.examples) and all(e.target is not None for e in self.examples)

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


def _bbc_articles(asset: str) -> list[tuple[str, str]]:
    """``(article, topic)`` for every BBC file, in path order, exact duplicates dropped."""
    root = package_dir(get_asset(asset)) / "bbcnews" / "data"
    pairs = [(_read_text(path).strip(), path.parent.name) for path in sorted(root.glob("*/*.txt"))]
    return _dedupe([(t, lab) for t, lab in pairs if t])


def _load_bbc_news() -> tuple[list[Example], list[str]]:
    return _labeled(_bbc_articles("bbc-news"))


def _load_bbc_headlines() -> tuple[list[Example], list[str]]:
    # Each file's first line is the headline; the body follows after a blank line.
    examples, names = _labeled(_bbc_articles("bbc-headlines"))
    out = []
    for example in examples:
        headline, _, body = example.text.partition("\n")
        if headline.strip() and body.strip():
            out.append(Example(body.strip(), example.label, headline.strip()))
    return out, names


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


def _load_dialogue_pairs() -> tuple[list[Example], list[str]]:
    # ChatterBot reads a conversation [t0, t1, t2, ...] as statement -> response pairs
    # (t0 -> t1, t1 -> t2, ...); each becomes prompt -> target, labeled by topic.
    root = package_dir(get_asset("dialogue-pairs")) / "data" / "english"
    rows: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations") or []:
            said = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            for prompt, response in zip(said, said[1:], strict=False):
                if (prompt, response) not in seen:
                    seen.add((prompt, response))
                    rows.append((prompt, path.stem, response))
    examples, names = _labeled([(prompt, topic) for prompt, topic, _ in rows])
    targets = [response for _, _, response in rows]
    return [Example(e.text, e.label, t) for e, t in zip(examples, targets, strict=True)], names


EMBEDDED_DATASETS: dict[str, Callable[[], tuple[list[Example], list[str]]]] = {
    "bbc-news": _load_bbc_news,
    "bbc-headlines": _load_bbc_headlines,
    "rotten-tomatoes": _load_rotten_tomatoes,
    "hamlet": _load_hamlet,
    "dialogue": _load_dialogue,
    "dialogue-pairs": _load_dialogue_pairs,
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
        size = path.stat().st_size
        if size == 0 or (size < 4096 and not path.read_bytes().strip()):
            raise ConfigError("data.dataset", f"{path} is empty (no rows)")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # pyarrow and datasets raise many kinds on bad files
            reason = _read_error(err)
            raise ConfigError("data.dataset", f"could not read {path}: {reason}") from None
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


def _read_error(err: BaseException) -> str:
    """The most telling line of a load failure: datasets wraps the parser's error (whose
    message says what is wrong) in a generic one."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    for cause in reversed(seen):  # the innermost error that has something to say
        text = str(cause).strip()
        if text:
            first = text.splitlines()[0]
            if "no data" in first and "Instruction" in first:
                return "no rows"
            return f"{type(cause).__name__}: {first}"
    return type(seen[0]).__name__


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


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def _targets(ds: Any, cfg: DataConfig, columns: list[str]) -> list[str | None] | None:
    """The ``data.target_field`` column as strings (``None`` per empty cell), or ``None``."""
    if cfg.target_field not in columns:
        # Like the label column: a missing target column means no targets, unless asked.
        if cfg.target_field != DataConfig.model_fields["target_field"].default:
            raise ConfigError(
                "data.target_field",
                f"column '{cfg.target_field}' not found (columns: {', '.join(columns)})",
            )
        return None
    return [str(t).strip() if _present(t) else None for t in ds[cfg.target_field]]


def _from_hf(ds: Any, cfg: DataConfig) -> tuple[list[Example], list[str]]:
    import datasets

    columns = list(ds.column_names)
    if cfg.text_field not in columns:
        raise ConfigError(
            "data.text_field",
            f"column '{cfg.text_field}' not found (columns: {', '.join(columns)})",
        )
    texts = ds[cfg.text_field]
    targets = _targets(ds, cfg, columns)
    # Rows with an empty target are dropped when the source has targets, as rows with an
    # empty label are when it has labels.
    keep = [
        _present(t) and (targets is None or targets[i] is not None)
        for i, t in enumerate(texts)
    ]
    target_of: list[str | None] = targets if targets is not None else [None] * len(texts)
    if cfg.label_field not in columns:
        # A missing label column means unlabeled text, unless the user asked for another
        # column than the default (compared by value: a stored config sets every field).
        if cfg.label_field != DataConfig.model_fields["label_field"].default:
            raise ConfigError(
                "data.label_field",
                f"column '{cfg.label_field}' not found (columns: {', '.join(columns)})",
            )
        examples = [
            Example(str(t), None, target_of[i]) for i, t in enumerate(texts) if keep[i]
        ]
        return examples, []

    raw = ds[cfg.label_field]
    feature = ds.features.get(cfg.label_field)
    if isinstance(feature, datasets.ClassLabel):
        # Keep the dataset's own ids and names; -1 marks an unlabeled row.
        names = [str(n) for n in feature.names]
        examples = [
            Example(str(t), int(y), target_of[i])
            for i, (t, y) in enumerate(zip(texts, raw, strict=True))
            if keep[i] and y is not None and 0 <= int(y) < len(names)
        ]
        return examples, names
    rows = [
        (str(t), y, target_of[i])
        for i, (t, y) in enumerate(zip(texts, raw, strict=True))
        if keep[i] and y is not None and str(y) != ""
    ]
    values = sorted({y for _, y, _ in rows}, key=_sort_key)
    index = {v: i for i, v in enumerate(values)}
    return [Example(t, index[y], target) for t, y, target in rows], [str(v) for v in values]


def load_text_dataset(cfg: DataConfig, seed: int) -> TextDataset:
    """Load ``data.dataset`` as a :class:`TextDataset`.

    Embedded: ``bbc-news`` (5 topics, exact duplicates dropped), ``bbc-headlines`` (the
    same articles: body -> target its headline, the file's first line), ``rotten-tomatoes``
    (fresh / rotten review snippets), ``hamlet`` (unlabeled ~500-character chunks),
    ``dialogue`` (ChatterBot conversations labeled by topic), ``dialogue-pairs`` (their
    statement -> response pairs as text -> target). Otherwise a local
    .csv/.json/.jsonl/.parquet file, a dir saved with ``save_to_disk``, or a hub name
    (split ``data.split``), reading columns ``data.text_field``, ``data.label_field`` and
    ``data.target_field``. String or numeric labels become ids into their sorted names; a
    ``ClassLabel`` keeps its own names; no label column means unlabeled text, no target
    column no targets. ``data.max_examples`` keeps a seeded random subset (in the source's
    order).

    Raises:
        ConfigError: missing file or column, unknown dataset, or no examples.
    """
    loader = EMBEDDED_DATASETS.get(cfg.dataset)
    if loader is not None:
        for name in _SOURCE_FIELDS:
            value, default = getattr(cfg, name), DataConfig.model_fields[name].default
            if value != default:
                raise ConfigError(f"data.{name}", f"'{cfg.dataset}' is an embedded dataset "
                                  f"with fixed columns, so {name} ({value!r}) would be ignored; "
                                  f"it applies to files and hub datasets (leave it {default!r})")
        examples, label_names = loader()
    else:
        ds = _open_hf(cfg)
        examples, label_names = _from_hf(ds, cfg)
        dropped = len(ds) - len(examples)
        if dropped:
            what = ["text"] + (["label"] if label_names else []) + (
                ["target"] if examples and examples[0].target is not None else [])
            log.warning("%s: dropped %d of %d rows with an empty or missing %s", cfg.dataset,
                        dropped, len(ds), "/".join(what))
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
