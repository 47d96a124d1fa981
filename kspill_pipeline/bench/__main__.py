"""Run the registered benchmarks and print their ratios (none yet beyond the ingestion one)."""

from kspill_pipeline.bench.run import main

raise SystemExit(main())
