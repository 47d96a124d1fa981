"""Freshness of raw inputs and stored partitions (pure: no Dagster import).

Two questions, answered from files alone so that they hold across Dagster instances (the CLI's
``--ephemeral`` runs, the UI's runs, a wiped ``.dagster`` folder):

1. *Which years' raw customs files were added or changed?* :func:`year_fingerprints` hashes,
   per year, the sorted list of ``(relative path, size, sha256 of the content)`` of the files that
   :func:`kspill_pipeline.io.raw.discover_files` assigns to that year (the same discovery the
   cleaning asset uses). Content is read in 1 MiB chunks with :mod:`hashlib`; a
   :class:`FileHashCache` keyed by ``(size, mtime_ns)`` skips re-reading files whose stat is
   unchanged, so a sensor tick over an unchanged 20 GB data folder costs one ``stat`` per file.
   Touching a file (new mtime, same bytes) re-reads it but gives the same fingerprint.
   The raw-data sensor (``automation.py``) keeps these fingerprints in its cursor.

2. *Is a stored partition current?* After every ``kspill run`` / ``kspill backfill`` step the CLI
   writes a lineage record ``_lineage.json`` beside the partition's data (same folder as the
   check gate ``_checks.json`` of :mod:`kspill_pipeline.io.store`): the fingerprint of every input
   the partition was computed from (upstream partitions: :func:`store.data_fingerprint`, i.e. file
   names, sizes and mtimes; raw customs files: the content fingerprint of (1); the run
   configuration that applies to the asset), their combined ``input_hash``, the outcome of the
   asset's checks in that run and the partition's own data fingerprint. :func:`partition_status`
   then calls a partition *current* when it is published, its lineage exists, its data were not
   rewritten since (fingerprint unchanged), every blocking check passed (lineage record and, when
   the asset records one, its check gate) and the inputs it would be computed from now have the
   recorded hash. Anything else is *stale*, with a reason naming the input that changed.

Code changes are not fingerprinted: after changing cleaning or model code, force a rebuild
(``kspill backfill --force``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kspill_pipeline.io import store

CHUNK_BYTES = 1 << 20
LINEAGE_NAME = "_lineage.json"
LINEAGE_FORMAT = "kspill-lineage/1"
MISSING = "missing"


# ------------------------------------------------------------------------------------------------
# content hashes of raw files
# ------------------------------------------------------------------------------------------------


def file_sha256(path: Path | str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 of a file's content, read in ``chunk_bytes`` chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk_bytes)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class FileHashCache:
    """``relative path -> (size, mtime_ns, sha256)``: content is re-read only when the stat changed.

    ``entries()`` returns the entries used since construction (vanished files are dropped), in a
    JSON-friendly form suitable for a sensor cursor or a cache file.
    """

    def __init__(self, entries: Mapping[str, Any] | None = None):
        self._old: dict[str, tuple[int, int, str]] = {}
        for k, v in (entries or {}).items():
            try:
                size, mtime, digest = v
                self._old[str(k)] = (int(size), int(mtime), str(digest))
            except (TypeError, ValueError):
                continue  # a malformed entry only costs a re-read
        self._used: dict[str, tuple[int, int, str]] = {}
        self.bytes_read = 0

    def digest(self, path: Path, rel: str) -> tuple[int, str]:
        st = path.stat()
        old = self._old.get(rel) or self._used.get(rel)
        if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            digest = old[2]
        else:
            digest = file_sha256(path)
            self.bytes_read += st.st_size
        self._used[rel] = (int(st.st_size), int(st.st_mtime_ns), digest)
        return int(st.st_size), digest

    def entries(self) -> dict[str, list]:
        return {k: list(v) for k, v in sorted(self._used.items())}


def _rel(path: Path, data_dir: Path) -> str:
    try:
        return path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def year_files(data_dir: Path | str) -> dict[int, list[Path]]:
    """Raw customs files per year, exactly as the cleaning asset discovers them."""
    from kspill_pipeline.io.raw import discover_files

    return discover_files(data_dir)


def fingerprint_files(paths: Iterable[Path], data_dir: Path | str, cache: FileHashCache | None = None) -> str:
    """One sha256 over the sorted ``(relative path, size, content sha256)`` of ``paths``."""
    data_dir = Path(data_dir)
    cache = cache if cache is not None else FileHashCache()
    rows = []
    for p in paths:
        rel = _rel(Path(p), data_dir)
        size, digest = cache.digest(Path(p), rel)
        rows.append(f"{rel}\t{size}\t{digest}")
    h = hashlib.sha256()
    for r in sorted(rows):
        h.update(r.encode("utf-8") + b"\n")
    return h.hexdigest()


def year_fingerprints(
    data_dir: Path | str,
    *,
    years: Iterable[int] | None = None,
    cache: FileHashCache | None = None,
    files: Mapping[int, list[Path]] | None = None,
) -> dict[int, str]:
    """Content fingerprint of each year's raw customs files (only ``years`` when given)."""
    files = year_files(data_dir) if files is None else files
    wanted = None if years is None else {int(y) for y in years}
    cache = cache if cache is not None else FileHashCache()
    return {int(y): fingerprint_files(ps, data_dir, cache) for y, ps in sorted(files.items())
            if wanted is None or int(y) in wanted}


@dataclass(frozen=True)
class YearChanges:
    added: list[int]
    changed: list[int]
    removed: list[int]

    @property
    def to_run(self) -> list[int]:
        return sorted(self.added + self.changed)


def changed_years(previous: Mapping[Any, str], current: Mapping[int, str]) -> YearChanges:
    """Years whose fingerprint appeared, changed or disappeared between two observations."""
    prev = {int(k): v for k, v in previous.items()}
    cur = {int(k): v for k, v in current.items()}
    return YearChanges(
        added=sorted(y for y in cur if y not in prev),
        changed=sorted(y for y in cur if y in prev and prev[y] != cur[y]),
        removed=sorted(y for y in prev if y not in cur),
    )


def young_years(files: Mapping[int, list[Path]], min_age_seconds: float, now: float | None = None) -> list[int]:
    """Years with a file modified less than ``min_age_seconds`` ago (probably still being copied)."""
    if min_age_seconds <= 0:
        return []
    now = time.time() if now is None else now
    out = []
    for y, ps in files.items():
        for p in ps:
            try:
                if now - p.stat().st_mtime < min_age_seconds:
                    out.append(int(y))
                    break
            except FileNotFoundError:
                out.append(int(y))
                break
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# schedule windows (which partitions a tick asks for)
# ------------------------------------------------------------------------------------------------


def newly_closed_year(tick_year: int, available: Iterable[int]) -> int | None:
    """The calendar year that closed before a tick in ``tick_year`` (``tick_year - 1``), when it is
    one of the ``available`` partitions; else None."""
    y = int(tick_year) - 1
    return y if y in {int(a) for a in available} else None


def revision_years(tick_year: int, available: Iterable[int], n: int) -> list[int]:
    """The last ``n`` closed years (``< tick_year``) among the ``available`` partitions, ascending.

    With data up to 2016 and a tick in 2017 and n=3: 2014, 2015, 2016. A tick in 2030 with the same
    data still re-runs 2014-2016 (the newest years the source has); a tick in 2010 gives 2007-2009.
    """
    closed = sorted(int(a) for a in available if int(a) < int(tick_year))
    return closed[-int(n):] if n > 0 else []


class AutomationSettings(BaseModel):
    """Settings of the schedules and the raw-data sensor (``automation:`` in ``<data>/source.yaml``;
    every key optional)."""

    model_config = ConfigDict(extra="forbid")

    revision_years: int = Field(3, ge=1, le=50, description="How many of the newest closed years the revision "
                                                            "schedule re-runs (revised customs releases).")
    new_year_cron: str = Field("0 3 15 1 *", description="When the newly closed year is materialised (UTC).")
    revision_cron: str = Field("0 3 15 7 *", description="When the last `revision_years` years are re-run (UTC).")
    sensor_interval_seconds: int = Field(300, ge=30, description="Minimum seconds between raw-data sensor ticks.")
    min_file_age_seconds: float = Field(
        60.0, ge=0, description="A year whose newest file is younger than this is left for a later tick "
                                "(the file may still be being copied).")

    @field_validator("new_year_cron", "revision_cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"cron {v!r}: expected 5 fields 'minute hour day-of-month month day-of-week'")
        return v


def load_automation_settings(data_dir: Path | str | None,
                             overrides: Mapping[str, Any] | None = None) -> AutomationSettings:
    """``automation:`` of ``<data>/source.yaml`` (absent: defaults), then ``overrides``.

    Raises ``ValueError`` naming the key and the allowed values / range."""
    raw: dict[str, Any] = {}
    f = Path(data_dir) / "source.yaml" if data_dir is not None else None
    if f is not None and f.is_file():
        import yaml

        body = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        raw = dict(body.get("automation") or {})
    raw.update(overrides or {})
    try:
        return AutomationSettings.model_validate(raw)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, prefix=f"{f or 'source.yaml'}: automation")) from None


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    """One line per error: ``prefix.key: message (got value)``."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        key = ".".join(x for x in (prefix, loc) if x)
        msg = err.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = err.get("input")
        got_s = "" if isinstance(got, dict) or err.get("type") == "missing" else f" (got {got!r})"
        lines.append(f"{key or '<config>'}: {msg}{got_s}")
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------------
# lineage records: is a stored partition current?
# ------------------------------------------------------------------------------------------------


def stored_fingerprint(root: Path | str, asset: str, year: int | str | None) -> str:
    """:func:`store.data_fingerprint`, or ``"missing"`` for an unpublished partition."""
    try:
        return store.data_fingerprint(root, asset, year)
    except FileNotFoundError:
        return MISSING


def config_digest(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def input_hash(inputs: Mapping[str, str]) -> str:
    """sha256 over the sorted ``input name -> fingerprint`` pairs."""
    h = hashlib.sha256()
    for k in sorted(inputs):
        h.update(f"{k}\t{inputs[k]}\n".encode("utf-8"))
    return h.hexdigest()


def lineage_path(root: Path | str, asset: str, year: int | str | None) -> Path:
    return store.partition_dir(root, asset, year) / LINEAGE_NAME


def read_lineage(root: Path | str, asset: str, year: int | str | None) -> dict | None:
    p = lineage_path(root, asset, year)
    if not p.is_file():
        return None
    try:
        body = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return body if body.get("format") == LINEAGE_FORMAT else None


def write_lineage(
    root: Path | str,
    asset: str,
    year: int | str | None,
    *,
    inputs: Mapping[str, str],
    checks: Mapping[str, bool],
    blocking: Iterable[str] = (),
    run_id: str | None = None,
) -> Path:
    """Record what a freshly written partition was computed from (atomic: temp file + replace)."""
    d = store.partition_dir(root, asset, year)
    d.mkdir(parents=True, exist_ok=True)
    body = {
        "format": LINEAGE_FORMAT,
        "asset": asset,
        "year": None if year is None else int(year),
        "input_hash": input_hash(inputs),
        "inputs": dict(sorted(inputs.items())),
        "checks": {k: bool(v) for k, v in sorted(checks.items())},
        "blocking_checks": sorted(set(blocking)),
        "data_fingerprint": stored_fingerprint(root, asset, year),
        "run_id": run_id,
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = d / f"{store.TMP_PREFIX}{uuid.uuid4().hex}-{LINEAGE_NAME}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / LINEAGE_NAME)
    return d / LINEAGE_NAME


@dataclass(frozen=True)
class PartitionStatus:
    asset: str
    year: int | None
    current: bool
    reason: str

    @property
    def label(self) -> str:
        return f"{self.asset}[{self.year if self.year is not None else 'all'}]"


def partition_status(root: Path | str, asset: str, year: int | str | None,
                     inputs: Mapping[str, str]) -> PartitionStatus:
    """Is the stored partition current with respect to ``inputs`` (name -> fingerprint, as it
    would be recorded now)? See the module docstring for the rules."""
    y = None if year is None else int(year)

    def st(ok: bool, why: str) -> PartitionStatus:
        return PartitionStatus(asset, y, ok, why)

    if not store.is_published(root, asset, y):
        return st(False, "not materialised")
    rec = read_lineage(root, asset, y)
    if rec is None:
        return st(False, "no lineage record (written outside kspill run/backfill, or its run was interrupted)")
    if rec.get("data_fingerprint") != stored_fingerprint(root, asset, y):
        return st(False, "data rewritten after its lineage was recorded")
    checks = rec.get("checks") or {}
    blocking = set(rec.get("blocking_checks") or checks)
    failed = sorted(k for k in blocking if not checks.get(k, False))  # failed, or never evaluated
    if failed:
        return st(False, f"blocking check(s) failed: {', '.join(failed)}")
    if (store.partition_dir(root, asset, y) / store.GATE_NAME).is_file():
        problems = store.gate_problems(root, asset, [y])
        if problems:
            return st(False, problems[0].split(": ", 1)[-1])
    if rec.get("input_hash") != input_hash(inputs):
        old = rec.get("inputs") or {}
        diff = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
        return st(False, f"inputs changed since it was built: {shown}")
    return st(True, "current")


# ------------------------------------------------------------------------------------------------
# persisted raw-hash cache of the CLI (the sensor keeps its own in its cursor)
# ------------------------------------------------------------------------------------------------

CACHE_DIR = "_kspill_meta"
RAW_HASH_CACHE = "raw_file_hashes.json"


def load_hash_cache(root: Path | str) -> FileHashCache:
    p = Path(root) / CACHE_DIR / RAW_HASH_CACHE
    try:
        return FileHashCache(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, AttributeError):
        return FileHashCache()


def save_hash_cache(root: Path | str, cache: FileHashCache) -> None:
    d = Path(root) / CACHE_DIR
    d.mkdir(parents=True, exist_ok=True)
    old = {}
    try:
        old = json.loads((d / RAW_HASH_CACHE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        pass
    old.update(cache.entries())
    tmp = d / f"{store.TMP_PREFIX}{uuid.uuid4().hex}-{RAW_HASH_CACHE}"
    tmp.write_text(json.dumps(old, indent=0, sort_keys=True), encoding="utf-8")
    os.replace(tmp, d / RAW_HASH_CACHE)


# ------------------------------------------------------------------------------------------------
# one tick of the raw-data sensor (the Dagster sensor in automation.py is a thin wrapper)
# ------------------------------------------------------------------------------------------------

RAW_INPUT = "customs_raw"
CURSOR_FORMAT = "kspill-raw-cursor/1"


def raw_input_name(year: int) -> str:
    """Lineage input name of a year's raw customs files."""
    return f"{RAW_INPUT}/{int(year)}"


@dataclass
class RawTick:
    """Outcome of one sensor tick: years to run (with their fingerprints), the next cursor and
    human-readable notes (years deferred, outside the partitions, removed...)."""

    requests: dict[int, str]
    cursor: dict
    notes: list[str]


def raw_sensor_tick(
    data_dir: Path | str,
    store_root: Path | str | None,
    available_years: Iterable[int],
    cursor: Mapping[str, Any] | None,
    *,
    min_file_age_seconds: float = 0.0,
    built_by: str = "trade_clean",
    now: float | None = None,
) -> RawTick:
    """Compare the per-year content fingerprints of the raw customs files with the cursor.

    * Years whose fingerprint is new or different are requested; unchanged years are not (a
      touched but identical file changes nothing).
    * First tick (no cursor): the store is the baseline. A year is requested when ``built_by``
      (trade_clean) has no published partition for it, or when the partition's lineage record
      names other raw content; years already built are taken as they are.
    * A year with a file younger than ``min_file_age_seconds`` is deferred to a later tick.
    * Years outside ``available_years`` (the partitions from ``source.yaml``) are never requested;
      a note names them.
    """
    available = {int(y) for y in available_years}
    prev_cursor = dict(cursor or {})
    first = not prev_cursor
    prev_years = {int(k): v for k, v in (prev_cursor.get("years") or {}).items()}
    cache = FileHashCache(prev_cursor.get("files") or {})
    files = year_files(data_dir)
    notes: list[str] = []
    young = set(young_years(files, min_file_age_seconds, now=now))
    if young:
        notes.append(f"year(s) {sorted(young)}: a file changed less than {min_file_age_seconds:g}s ago "
                     "(still being copied?); looked at again on the next tick")
    current = year_fingerprints(data_dir, cache=cache, files={y: ps for y, ps in files.items() if y not in young})
    def built_from(y: int, fp: str) -> bool | None:
        """Does the store hold ``built_by`` for year y made from this raw content? (None: unknown)"""
        if store_root is None or not store.is_published(store_root, built_by, y):
            return False
        recorded = ((read_lineage(store_root, built_by, y) or {}).get("inputs") or {}).get(raw_input_name(y))
        return None if recorded is None else recorded == fp

    if first:
        # baseline = the store: build what was never built (or built from other raw content)
        requests = {y: fp for y, fp in current.items() if built_from(y, fp) is False}
    else:
        ch = changed_years({y: v for y, v in prev_years.items() if y not in young}, current)
        requests = {y: current[y] for y in ch.changed}
        requests.update({y: current[y] for y in ch.added if built_from(y, current[y]) is not True})
        gone = [y for y in ch.removed if y not in files]
        if gone:
            notes.append(f"year(s) {gone}: raw files removed; stored outputs are kept")
    outside = sorted(y for y in requests if y not in available)
    if outside:
        lo, hi = (min(available), max(available)) if available else (None, None)
        notes.append(f"year(s) {outside} have raw files but are outside the yearly partitions {lo}-{hi}: "
                     "extend `years` in source.yaml and reload the code location")
        for y in outside:
            requests.pop(y)
    years_cursor = {str(y): v for y, v in sorted(prev_years.items()) if y in young}
    years_cursor.update({str(y): v for y, v in current.items() if y in available})
    # years outside the partitions stay out of the cursor, so they are requested once they exist
    new_cursor = {"format": CURSOR_FORMAT, "years": years_cursor, "files": cache.entries()}
    return RawTick(requests=dict(sorted(requests.items())), cursor=new_cursor, notes=notes)
