"""The code location loads, validates, and loads from another working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dagster import Definitions

from kspill_pipeline.definitions import build_definitions

REPO = Path(__file__).resolve().parent.parent


def test_definitions_validate_and_yearly_partitions(tmp_path):
    (tmp_path / "source.yaml").write_text("name: t\nyears: {start: 2003, end: 2006}\n")
    defs = build_definitions(tmp_path, tmp_path / "store")
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    from dagster import AssetKey

    node = graph.get(AssetKey("trade_clean"))
    assert node.partitions_def.get_partition_keys() == ["2003", "2004", "2005", "2006"]
    # every contract check is declared as a blocking check on the asset
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == AssetKey("trade_clean")}
    assert {"unique_grain", "not_null", "row_value_accounting", "ge_suite", "foreign_keys"} <= checks
    job = defs.resolve_job_def("yearly_trade")
    assert job.partitions_def is not None


def test_workspace_loads_from_another_working_directory(tmp_path):
    env = dict(os.environ, KSPILL_DATA_DIR=str(tmp_path), DAGSTER_HOME=str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (tmp_path / "source.yaml").write_text("name: t\nyears: {start: 2001, end: 2002}\n")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kspill" in (proc.stdout + proc.stderr)
