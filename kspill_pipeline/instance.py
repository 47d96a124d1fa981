"""The Dagster instance used by the CLI: the same embedded instance as ``make ui``.

``dagster.yaml`` at the repository root keeps runs, event logs and compute logs under
``.dagster/`` (relative paths resolve against the repository root). With ``DAGSTER_HOME`` set,
Dagster's own rule applies (``$DAGSTER_HOME/dagster.yaml``).
"""

from __future__ import annotations

import contextlib
import os

from dagster import DagsterInstance

from kspill_pipeline.config import REPO_ROOT


@contextlib.contextmanager
def cli_instance(ephemeral: bool = False):
    if ephemeral:
        yield DagsterInstance.ephemeral()
        return
    if os.environ.get("DAGSTER_HOME"):
        inst = DagsterInstance.get()
        try:
            yield inst
        finally:
            inst.dispose()
        return
    cwd = os.getcwd()
    (REPO_ROOT / ".dagster").mkdir(exist_ok=True)
    os.chdir(REPO_ROOT)
    try:
        inst = DagsterInstance.from_config(str(REPO_ROOT))
        try:
            yield inst
        finally:
            inst.dispose()
    finally:
        os.chdir(cwd)
