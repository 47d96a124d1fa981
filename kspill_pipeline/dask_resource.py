"""Dask client as a Dagster resource (the computation itself stays in plain functions).

``DaskResource`` starts a ``distributed.LocalCluster`` (size from configuration, no dashboard port
unless ``dashboard=True``) plus a ``Client`` for the duration of one step, or connects to an
existing cluster when ``scheduler_address`` is set, so a user with a real Dask cluster scales out
without code changes. Both are closed at step end, also when the step fails.

In an asset::

    @asset
    def firm_import_density(context, dask: DaskResource, ...):
        res = firm_density_to_parquet(..., client=dask.client)

Outside Dagster (scripts, benchmarks)::

    with DaskResource(n_workers=2).get_client() as client:
        ...

Ad-hoc scripts that start a process-based cluster need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr


class DaskResource(ConfigurableResource):
    """A Dask ``Client`` for one Dagster step: a LocalCluster by default, or an existing cluster."""

    n_workers: int = Field(default=2, description="LocalCluster workers (keep <= cores; BLAS multithreads too).")
    threads_per_worker: int = Field(default=1, description="Threads per LocalCluster worker.")
    memory_limit: str = Field(default="6GB", description="Memory limit per LocalCluster worker (dask syntax).")
    scheduler_address: str | None = Field(
        default=None, description="Address of an existing scheduler (e.g. tcp://host:8786); no LocalCluster then."
    )
    dashboard: bool = Field(
        default=False,
        description="Serve the dashboard on 127.0.0.1:8787 (needs bokeh); off: no port 8787 is taken.",
    )
    processes: bool = Field(default=True, description="Worker processes (True) or threads in this process.")
    tune_malloc: bool = Field(
        default=True,
        description=(
            "LocalCluster worker processes only: replace distributed's MALLOC_TRIM_THRESHOLD_=64KiB with glibc "
            "settings that let freed numpy blocks be reused (trim 128 MiB, mmap threshold 32 MiB)."
        ),
    )
    preload: list[str] = Field(
        default_factory=lambda: ["kspill_pipeline.compute.firm_density", "kspill_pipeline.compute.relatedness"],
        description="Modules imported on every worker when the client connects (keeps imports out of the first task).",
    )

    _client: Any = PrivateAttr(default=None)
    _cluster: Any = PrivateAttr(default=None)

    # ---------------------------------------------------------------- plain (non-Dagster) use
    @contextlib.contextmanager
    def get_client(self) -> Iterator[Any]:
        """Context manager yielding a connected ``distributed.Client``; closes client and cluster."""
        import dask
        from distributed import Client, LocalCluster

        cluster = None
        client = None
        try:
            if self.scheduler_address:
                client = Client(self.scheduler_address)
            else:
                # worker processes get OMP/OPENBLAS/MKL_NUM_THREADS=1 from distributed's
                # nanny pre-spawn environment, so n_workers x BLAS threads never exceeds the cores
                with dask.config.set(self._worker_env_config()):
                    cluster = LocalCluster(
                        n_workers=self.n_workers,
                        threads_per_worker=self.threads_per_worker,
                        memory_limit=self.memory_limit,
                        processes=self.processes,
                        # dashboard off: the scheduler still serves /health and /metrics over
                        # HTTP, and would take port 8787; bind that to a free loopback port
                        dashboard_address="127.0.0.1:8787" if self.dashboard else None,
                        scheduler_kwargs=None if self.dashboard else {"dashboard": False,
                                                                      "dashboard_address": "127.0.0.1:0"},
                    )
                client = Client(cluster)
            if self.preload:
                client.run(_import_modules, list(self.preload))
            yield client
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()

    def _worker_env_config(self) -> dict:
        """dask config for the nanny's pre-spawn environment of LocalCluster workers.

        distributed sets ``MALLOC_TRIM_THRESHOLD_=65536`` so that workers hand freed memory back to
        the OS. Setting it also switches off glibc's dynamic mmap threshold, so every numpy block
        above 128 KiB is mmapped and page-faulted afresh on each allocation: the block-wise density
        kernel ran 2-4x slower in workers than in a plain process (full synthetic year, block
        256-4096 rows). ``tune_malloc`` keeps up to 128 MiB of freed heap and serves blocks below
        32 MiB from the heap; memory is still returned above that.
        """
        import dask
        import distributed  # noqa: F401  (registers the distributed config defaults)

        env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
        if self.tune_malloc and self.processes:
            env["MALLOC_TRIM_THRESHOLD_"] = 128 * 2**20
            env["MALLOC_MMAP_THRESHOLD_"] = 32 * 2**20
        return {"distributed.nanny.pre-spawn-environ": env}

    def describe(self) -> str:
        """One line for run metadata: where the work runs."""
        if self.scheduler_address:
            return f"dask cluster at {self.scheduler_address}"
        kind = "processes" if self.processes else "threads"
        return (f"dask LocalCluster {self.n_workers} {kind} x {self.threads_per_worker} thread(s), "
                f"{self.memory_limit}/worker, dashboard {'on' if self.dashboard else 'off'}")

    # ---------------------------------------------------------------- Dagster lifecycle
    @contextlib.contextmanager
    def yield_for_execution(self, context: InitResourceContext) -> Iterator["DaskResource"]:
        with self.get_client() as client:
            self._client = client
            self._cluster = getattr(client, "cluster", None)
            log = getattr(context, "log", None)
            if log is not None:
                log.info(f"dask client connected: {self.describe()}")
            try:
                yield self
            finally:
                self._client = None
                self._cluster = None

    @property
    def client(self) -> Any:
        """The live ``distributed.Client`` (only inside a step that requires this resource)."""
        if self._client is None:
            raise RuntimeError(
                "DaskResource.client is only available during step execution; outside Dagster use "
                "`with DaskResource(...).get_client() as client:`"
            )
        return self._client


def _import_modules(modules: list[str]) -> list[str]:
    """Run on every worker: import ``modules``; returns the ones that failed (never raises, so a
    remote cluster without kspill installed fails later with the real error of the task)."""
    import importlib

    failed = []
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception:  # pragma: no cover - depends on the remote environment
            failed.append(m)
    return failed
