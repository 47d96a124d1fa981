"""Schedules, the raw-data sensor and declarative automation (kspill_pipeline/automation.py).

Expected partitions are derived by hand from the rules stated in the README "Daily use" section
(the year before the tick; the newest N closed years; the years whose files this test changes;
the partition mappings of the S000 assets: history window t-200..t, lag window t-1..t, all years
for the study-wide assets), never read back from the code under test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    AssetSelection,
    DagsterInstance,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
)

from kspill_pipeline.definitions import build_definitions
from kspill_pipeline.io import freshness, store

warnings.filterwarnings("ignore")

REFS = {"ref_prefecture", "ref_hs_concordance"}  # reference tables: built by the first full run
#: the yearly-job assets the study assets read (the simulated yearly runs report only these, to keep the
#: event log small; the other yearly assets have no downstream study asset)
STUDY_INPUTS = {"trade_clean", "firm_city", "product_relatedness", "city_import_density", "firm_import_density"}
YEARLY = {"trade_clean", "trade_quarantine", "trade_cleaning_report", "firm_city", "product_relatedness",
          "city_export_rca", "city_export_density", "city_complexity", "city_import_density", "firm_import_density"}


def _source(d: Path, start: int, end: int, automation: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "customs").mkdir(exist_ok=True)
    (d / "source.yaml").write_text(f"name: t\nyears: {{start: {start}, end: {end}}}\ncustoms_dir: customs\n"
                                   + automation, encoding="utf-8")
    return d


def _tick(defs, name: str, when: datetime):
    sched = defs.resolve_schedule_def(name)
    with build_schedule_context(scheduled_execution_time=when, repository_def=defs.get_repository_def()) as ctx:
        return sched.evaluate_tick(ctx)


def _years(data) -> list[str]:
    return sorted(r.partition_key for r in (data.run_requests or []))


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defs_2000_2016(tmp_path_factory):
    d = _source(tmp_path_factory.mktemp("src"), 2000, 2016)
    return build_definitions(d, d / "store")


def test_schedules_and_sensors_are_off_until_enabled_and_target_the_yearly_job(defs_2000_2016):
    defs = defs_2000_2016
    for name in ("new_year_schedule", "revision_schedule"):
        s = defs.resolve_schedule_def(name)
        assert s.default_status == DefaultScheduleStatus.STOPPED
        assert s.job_name == "yearly_refresh"
        assert s.execution_timezone == "UTC"
    assert defs.resolve_schedule_def("new_year_schedule").cron_schedule == "0 3 15 1 *"
    for name in ("raw_customs_sensor", "kspill_automation"):
        assert defs.resolve_sensor_def(name).default_status == DefaultSensorStatus.STOPPED
    job = defs.resolve_job_def("yearly_refresh")
    graph = defs.resolve_asset_graph()
    selected = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert selected == YEARLY  # the self-contained yearly assets only; the study assets follow by automation
    # every study asset downstream (yearly and all-years) carries an automation condition; none of the job's
    for k in graph.get_all_asset_keys():
        name = k.to_user_string()
        cond = graph.get(k).automation_condition
        if name in YEARLY or name == "customs_raw":
            assert cond is None, name
        elif name in REFS:
            assert cond.get_label() == "on_missing", name
        elif _is_s000(name):
            assert cond is not None, name


@pytest.mark.parametrize("when, expected", [
    (datetime(2017, 1, 15, 3, tzinfo=timezone.utc), ["2016"]),  # the year that just closed
    (datetime(2010, 1, 15, 3, tzinfo=timezone.utc), ["2009"]),
    (datetime(2001, 1, 15, 3, tzinfo=timezone.utc), ["2000"]),  # first partition
    (datetime(2018, 1, 15, 3, tzinfo=timezone.utc), []),        # 2017 is not a partition
    (datetime(2000, 1, 15, 3, tzinfo=timezone.utc), []),        # 1999 is not a partition
])
def test_new_year_schedule_requests_the_previous_calendar_year_when_it_is_a_partition(defs_2000_2016, when, expected):
    data = _tick(defs_2000_2016, "new_year_schedule", when)
    assert _years(data) == expected
    if expected:
        assert [r.run_key for r in data.run_requests] == [f"new_year:{expected[0]}"]
    else:
        assert str(when.year - 1) in data.skip_message and "source.yaml" in data.skip_message


@pytest.mark.parametrize("when, expected", [
    (datetime(2017, 7, 15, 3, tzinfo=timezone.utc), ["2014", "2015", "2016"]),
    (datetime(2030, 7, 15, 3, tzinfo=timezone.utc), ["2014", "2015", "2016"]),  # newest years the source has
    (datetime(2010, 7, 15, 3, tzinfo=timezone.utc), ["2007", "2008", "2009"]),  # 2010 is not closed yet
    (datetime(2001, 7, 15, 3, tzinfo=timezone.utc), ["2000"]),
    (datetime(2000, 7, 15, 3, tzinfo=timezone.utc), []),
])
def test_revision_schedule_reruns_the_newest_three_closed_years(defs_2000_2016, when, expected):
    data = _tick(defs_2000_2016, "revision_schedule", when)
    assert _years(data) == expected
    assert len({r.run_key for r in data.run_requests or []}) == len(expected)  # one run per year


def test_revision_window_and_crons_come_from_source_yaml(tmp_path):
    d = _source(tmp_path, 2000, 2016, "automation:\n  revision_years: 5\n  revision_cron: '0 2 1 3 *'\n")
    defs = build_definitions(d, d / "store")
    assert defs.resolve_schedule_def("revision_schedule").cron_schedule == "0 2 1 3 *"
    data = _tick(defs, "revision_schedule", datetime(2017, 3, 1, 2, tzinfo=timezone.utc))
    assert _years(data) == ["2012", "2013", "2014", "2015", "2016"]


@pytest.mark.parametrize("body, key", [
    ("automation:\n  revision_years: 0\n", "automation.revision_years"),
    ("automation:\n  revison_years: 3\n", "automation.revison_years"),
    ("automation:\n  new_year_cron: 'every january'\n", "automation.new_year_cron"),
])
def test_invalid_automation_settings_name_the_key(tmp_path, body, key):
    d = _source(tmp_path, 2000, 2016, body)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_definitions(d, d / "store")


# ------------------------------------------------------------------------------------------------
# raw-data sensor
# ------------------------------------------------------------------------------------------------


def test_file_hashes_are_sha256_of_the_content_and_cached_by_stat(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b"x" * (3 << 20) + b"tail")  # several 1 MiB chunks
    assert freshness.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    cache = freshness.FileHashCache()
    fp1 = freshness.fingerprint_files([f], tmp_path, cache)
    again = freshness.FileHashCache(cache.entries())
    assert freshness.fingerprint_files([f], tmp_path, again) == fp1 and again.bytes_read == 0  # stat unchanged
    expected = hashlib.sha256(f"a.csv\t{f.stat().st_size}\t{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                              .encode()).hexdigest()
    assert fp1 == expected


@pytest.fixture()
def raw_copy(tiny_universe, tmp_path):
    """A writable copy of the tiny universe's raw files, with the sensor's copy-settling delay off."""
    d = tmp_path / "data"
    shutil.copytree(tiny_universe / "customs", d / "customs")
    src = (tiny_universe / "source.yaml").read_text(encoding="utf-8")
    (d / "source.yaml").write_text(src + "\nautomation:\n  min_file_age_seconds: 0\n", encoding="utf-8")
    return d


def _sensor_tick(defs, cursor):
    sensor = defs.resolve_sensor_def("raw_customs_sensor")
    with build_sensor_context(cursor=cursor, definitions=defs, instance=DagsterInstance.ephemeral()) as ctx:
        return sensor.evaluate_tick(ctx)


def _append_row(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines) + lines[-1])  # a duplicated record: same size + one line


def test_sensor_requests_exactly_the_years_whose_files_were_added_or_changed(raw_copy, tmp_path):
    st = tmp_path / "store"
    defs = build_definitions(raw_copy, st)
    all_years = sorted(int(p.name) for p in (raw_copy / "customs").iterdir())
    assert all_years == list(range(2000, 2017))

    # first tick, empty store: every year with files is new
    t = _sensor_tick(defs, None)
    assert _years(t) == [str(y) for y in all_years]
    assert defs.resolve_sensor_def("raw_customs_sensor").job_name == "yearly_refresh"
    cursor = t.cursor

    # nothing changed -> nothing requested
    t = _sensor_tick(defs, cursor)
    assert _years(t) == [] and t.skip_message
    cursor = t.cursor

    # touched only (new mtime, same bytes) -> nothing; content of 2005 changed + a new month file in 2003
    f2005 = raw_copy / "customs" / "2005" / "customs_2005.csv"
    os.utime(f2005, (time.time() + 5, time.time() + 5))
    t = _sensor_tick(defs, cursor)
    assert _years(t) == []
    cursor = t.cursor
    _append_row(f2005)
    d2003 = raw_copy / "customs" / "2003"
    shutil.copy(d2003 / "customs_2003_m1.csv", d2003 / "customs_2003_m13x.csv")
    t = _sensor_tick(defs, cursor)
    assert _years(t) == ["2003", "2005"]
    keys = {r.partition_key: r.run_key for r in t.run_requests}
    assert keys["2005"].startswith("raw:2005:")
    cursor = t.cursor

    # a year's files removed (nothing to run), then dropped in again -> exactly that year
    moved = tmp_path / "held_2016"
    shutil.move(raw_copy / "customs" / "2016", moved)
    t = _sensor_tick(defs, cursor)
    assert _years(t) == [] and "2016" in t.skip_message
    cursor = t.cursor
    shutil.move(moved, raw_copy / "customs" / "2016")
    t = _sensor_tick(defs, cursor)
    assert _years(t) == ["2016"]
    cursor = t.cursor

    # files of a year outside the partitions (source.yaml ends 2016) are reported, never requested
    (raw_copy / "customs" / "2017").mkdir()
    shutil.copy(raw_copy / "customs" / "2010" / "customs_2010.csv", raw_copy / "customs" / "2017" / "customs_2017.csv")
    t = _sensor_tick(defs, cursor)
    assert _years(t) == [] and "2017" in t.skip_message and "source.yaml" in t.skip_message


def test_first_tick_takes_the_built_store_as_baseline(raw_copy, tmp_path):
    st = tmp_path / "store"
    import polars as pl

    for y in range(2000, 2017):
        if y not in (2004, 2009):
            store.write_frame(pl.DataFrame({"year": [y]}), st, "trade_clean", y)
    # 2012 was built (per its lineage record) from other raw content than what is there now
    freshness.write_lineage(st, "trade_clean", 2012, inputs={"customs_raw/2012": "0" * 64}, checks={})
    # 2013's lineage names exactly the current content -> current
    fp13 = freshness.year_fingerprints(raw_copy, years=[2013])[2013]
    freshness.write_lineage(st, "trade_clean", 2013, inputs={"customs_raw/2013": fp13}, checks={})
    defs = build_definitions(raw_copy, st)
    t = _sensor_tick(defs, None)
    assert _years(t) == ["2004", "2009", "2012"]


def test_sensor_waits_for_files_still_being_copied(raw_copy, tmp_path):
    src = (raw_copy / "source.yaml").read_text(encoding="utf-8").replace("min_file_age_seconds: 0",
                                                                         "min_file_age_seconds: 60")
    (raw_copy / "source.yaml").write_text(src, encoding="utf-8")
    old = time.time() - 3600
    for p in (raw_copy / "customs").rglob("*.*"):
        os.utime(p, (old, old))
    defs = build_definitions(raw_copy, tmp_path / "store")
    cursor = _sensor_tick(defs, None).cursor
    f = raw_copy / "customs" / "2007" / "customs_2007.csv"
    _append_row(f)  # mtime = now: may still be being copied
    t = _sensor_tick(defs, cursor)
    assert _years(t) == [] and "2007" in t.skip_message
    os.utime(f, (old, old))  # settled
    t = _sensor_tick(defs, t.cursor)
    assert _years(t) == ["2007"]


# ------------------------------------------------------------------------------------------------
# declarative automation
# ------------------------------------------------------------------------------------------------


class _Sim:
    """Writes what a finished run writes into an instance: materialisations and check evaluations
    of the given assets and partitions, under one (simulated) run id."""

    def __init__(self, defs):
        from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData

        self._de, self._t, self._mat = DagsterEvent, DagsterEventType, StepMaterializationData
        self.defs = defs
        self.graph = defs.resolve_asset_graph()
        self.instance = DagsterInstance.ephemeral()
        self.cursor = None

    def _event(self, run_id, typ, data):
        self.instance.report_dagster_event(run_id=run_id, dagster_event=self._de(
            event_type_value=typ.value, event_specific_data=data, job_name="simulated"))

    def ran(self, names, years, failed_checks=()):
        run_id = str(uuid.uuid4())
        for name in names:
            key = AssetKey(name)
            parts = years if self.graph.get(key).partitions_def is not None else [None]
            specs = [s for s in self.defs.resolve_assets_def(key).check_specs if s.asset_key == key]
            for y in parts:
                self._event(run_id, self._t.ASSET_MATERIALIZATION, self._mat(AssetMaterialization(key, partition=y)))
                for s in specs:
                    ok = (name, y, s.name) not in failed_checks
                    self._event(run_id, self._t.ASSET_CHECK_EVALUATION,
                                AssetCheckEvaluation(key, s.name, passed=ok, partition=y))

    def evaluate(self) -> dict:
        """Requested partitions (or 1 for an unpartitioned asset) of the S000 study assets; other
        studies' assets downstream of the yearly job are automated too but not asserted on here."""
        r = evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = r.cursor
        out = {}
        for k in self.graph.get_all_asset_keys():
            name = k.to_user_string()
            if r.get_num_requested(k) and _is_s000(name):
                parts = r.get_requested_partitions(k)
                out[name] = sorted(parts) if parts != {None} else 1
        return out


def _is_s000(name: str) -> bool:
    return name == "firm_export_history" or name.startswith("s000_")


@pytest.fixture()
def three_years(tmp_path):
    d = _source(tmp_path, 2014, 2016)
    return build_definitions(d, d / "store")


def _study(defs) -> list[str]:
    g = defs.resolve_asset_graph()
    return sorted(k.to_user_string() for k in g.get_all_asset_keys()
                  if g.get(k).automation_condition is not None and k.to_user_string() not in REFS)


def test_study_assets_follow_their_yearly_inputs_and_all_years_assets_run_once(three_years):
    sim = _Sim(three_years)
    ys = ["2014", "2015", "2016"]
    all_years = sorted(n for n in _study(three_years)
                       if _is_s000(n) and sim.graph.get(AssetKey(n)).partitions_def is None)
    assert {"s000_city_marketization", "s000_table1", "s000_table2"} <= set(all_years)

    assert sim.evaluate() == {}  # switching automation on rebuilds nothing
    sim.ran(STUDY_INPUTS | REFS, ys)  # e.g. the first backfill of the yearly job
    # first export history needs trade_clean only; marketization needs all years of trade_clean/firm_city/...
    assert sim.evaluate() == {"firm_export_history": ys, "s000_city_marketization": 1}
    sim.ran(_study(three_years), ys)
    assert sim.evaluate() == {}  # everything current: nothing more, nothing per year

    # revised 2015 release (revision schedule / sensor re-ran the yearly job for 2015)
    sim.ran(STUDY_INPUTS, ["2015"])
    got = sim.evaluate()
    # history window t-200..t: 2015 and 2016 read trade_clean 2015; controls follow the history;
    # panel: lag window t-1..t -> 2015, 2016; marketization (all years) once
    assert got == {"firm_export_history": ["2015", "2016"], "s000_firm_controls": ["2015", "2016"],
                   "s000_panel": ["2015", "2016"], "s000_city_marketization": 1}
    sim.ran(got.keys(), ["2015", "2016"])
    # next tick: the study-wide tables and figures, once each, after the yearly panels; and panel 2014,
    # which reads the marketization groups that were just rebuilt (the same backfill orders them)
    assert sim.evaluate() == {n: 1 for n in all_years if n != "s000_city_marketization"} | {"s000_panel": ["2014"]}


def test_automation_waits_for_blocking_checks_and_for_queued_yearly_runs(three_years):
    sim = _Sim(three_years)
    ys = ["2014", "2015", "2016"]
    sim.evaluate()
    sim.ran(STUDY_INPUTS | REFS, ys)
    sim.ran(_study(three_years), ys)
    assert sim.evaluate() == {}

    # 2016 re-run, but a blocking check of trade_clean 2016 failed: nothing downstream of it moves
    sim.ran(STUDY_INPUTS, ["2016"], failed_checks={("trade_clean", "2016", "not_null")})
    assert sim.evaluate() == {}
    sim.ran(STUDY_INPUTS, ["2016"])  # fixed
    assert sim.evaluate() == {"firm_export_history": ["2016"], "s000_firm_controls": ["2016"],
                              "s000_panel": ["2016"], "s000_city_marketization": 1}
    sim.ran(_study(three_years), ys)
    sim.evaluate()

    # revision schedule: 2014 finished, 2015 and 2016 still queued -> the all-years asset waits
    sim.ran(STUDY_INPUTS, ["2014"])
    job = three_years.resolve_job_def("yearly_refresh")
    yearly_keys = AssetSelection.groups("trade", "relatedness").resolve(sim.graph)
    for y in ("2015", "2016"):
        sim.instance.create_run_for_job(job_def=job, tags={"dagster/partition": y},
                                        asset_selection=frozenset(yearly_keys))
    got = sim.evaluate()
    assert "s000_city_marketization" not in got
    for run in sim.instance.get_runs():
        sim.instance.report_run_failed(run)  # end them (finished status), then their results land
    sim.ran(STUDY_INPUTS, ["2015", "2016"])
    got = sim.evaluate()
    assert got.get("s000_city_marketization") == 1
    assert got.get("firm_export_history") == ys
