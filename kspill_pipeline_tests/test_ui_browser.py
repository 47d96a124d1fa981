"""The Dagster UI, tested in a real browser (issue 7, "The UI, tested in a real browser").

One module-scoped server: a tiny synthetic universe (4 years) in a temporary folder, a temporary
``DAGSTER_HOME`` whose ``dagster.yaml`` is the project's with its ``base_dir`` paths moved into that
folder, the S000 study pre-materialised with the ``kspill run`` CLI, and ``make ui`` (the real Makefile
target, ``dagster dev -w workspace.yaml -h 127.0.0.1``) on a free port. The CLI and the UI share the
instance, so the UI must show the CLI's materialisations.

Playwright for Python drives Debian's ``/usr/bin/chromium`` headless (it never downloads a browser;
``scripts/ensure_chromium.sh``, run by ``make test``, installs Chromium with apt). Steps, each saved
as a screenshot in ``.artifacts/ui/`` (and in ``docs/screenshots/`` with
``KSPILL_UPDATE_SCREENSHOTS=1``; the README shows those):

1. Lineage: the global asset graph shows the asset groups.
2. Filter the graph to the ``trade`` group: ``trade_clean`` is 100% filled by the CLI runs.
3. ``trade_clean`` asset page (opened from the graph's side panel).
4. Materialize (confirm the multi-asset siblings) -> partition dialog: type one year -> "Launch 1 run".
5. The launched run's page shows Success (GraphQL is polled only to know when to look).
6. The asset's Checks tab lists every declared check as Succeeded, evaluated by that run.
7. ``s000_figure1``: the ``figure`` metadata entry opens as Markdown with the rendered PNG, which is
   byte-identical to the ``figure.png`` written to the store.

On a failing step, a screenshot, the page HTML and a Playwright trace are saved beside them.
Deselect with ``pytest -m "not browser"``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("KSPILL_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO_ROOT / ".artifacts" / "ui"
DOCS_SHOTS = REPO_ROOT / "docs" / "screenshots"
# Flags that keep Chromium off the (closed) network and out of first-run work.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
# 4 years keep the CLI pre-materialisation short; S000 panel rows need the lagged relatedness and
# export history, so the last year is the first with a non-empty panel (the year Fig. 1 draws).
YEARS = (2000, 2003)
UI_YEAR = "2002"  # the trade_clean partition launched from the browser
CLI_SELECT = 'group:trade or +key:"s000_figure1"'  # whole trade multi-asset + everything Fig. 1 needs
SERVER_START_TIMEOUT = 300
RUN_TIMEOUT = 420
UI_TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instance_yaml(home: Path) -> dict:
    """The project's dagster.yaml with every relative ``base_dir`` moved under ``home``."""
    cfg = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text(encoding="utf-8"))

    def move(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "base_dir" and isinstance(v, str) and not Path(v).is_absolute():
                    node[k] = str(home / Path(v).name)
                else:
                    move(v)
        elif isinstance(node, list):
            for v in node:
                move(v)

    move(cfg)
    return cfg


def _reset_signals():  # run in the child before exec: a background shell may have left SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop ``make ui`` and everything dagster dev started (one process group)."""
    pgid = proc.pid
    if not _group_alive(pgid):
        return
    os.killpg(pgid, signal.SIGINT)  # dagster dev shuts its webserver, daemon and code server down
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.5)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _graphql(base: str, query: str, variables: dict) -> dict:
    req = urllib.request.Request(
        base + "/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    if out.get("errors"):
        raise AssertionError(f"GraphQL errors: {out['errors']}")
    return out["data"]


RUN_QUERY = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status tags { key value } }
  }
}
"""


ERRORS_QUERY = """
query RunErrors($runId: ID!) {
  logsForRun(runId: $runId, limit: 1000) {
    ... on EventConnection { events { __typename ... on ErrorEvent { error { message } } } }
  }
}
"""


def _run_errors(base: str, run_id: str) -> str:
    """The error messages of a failed run (step and run failures), for the assertion message."""
    try:
        events = _graphql(base, ERRORS_QUERY, {"runId": run_id})["logsForRun"].get("events") or []
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"(could not read the run's events: {e})"
    msgs = [ev["error"]["message"].strip() for ev in events if (ev.get("error") or {}).get("message")]
    return "\n".join(dict.fromkeys(msgs))[-4000:]


def _wait_run(base: str, run_id: str) -> dict:
    """Poll GraphQL until the run is finished (a helper: the browser shows the outcome)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    run: dict = {}
    while time.monotonic() < deadline:
        run = _graphql(base, RUN_QUERY, {"runId": run_id})["runOrError"]
        if run.get("status") in {"SUCCESS", "FAILURE", "CANCELED"}:
            return run
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished after {RUN_TIMEOUT}s (last: {run})")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """Tiny universe + temporary instance + CLI-materialised S000 Fig. 1 + ``make ui`` on a free port."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the browser UI test needs Debian's chromium. `make test` runs "
            "scripts/ensure_chromium.sh, which installs it as root (apt-get install chromium); otherwise install "
            "it by hand, set KSPILL_CHROMIUM, or deselect with -m 'not browser'."
        )
    from kspill_pipeline.synthetic import generate

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        if old.is_file():
            old.unlink()
    tmp = tmp_path_factory.mktemp("ui")
    data, store, home = tmp / "data", tmp / "store", tmp / "dagster_home"
    generate(data, scale="tiny", seed=7, years=YEARS)
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(_instance_yaml(home)), encoding="utf-8")
    port = _free_port()
    env = dict(
        os.environ, DAGSTER_HOME=str(home), KSPILL_DATA_DIR=str(data), KSPILL_STORE_DIR=str(store),
        KSPILL_UI_PORT=str(port), DAGSTER_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
    )
    base = f"http://127.0.0.1:{port}"
    log = ARTIFACTS / "dagster_dev.log"
    log_fh = open(log, "w", encoding="utf-8")
    # Create the instance's SQLite storage once: dagster dev and the CLI creating it at the same time
    # race on the schema migration ("alembic_version has more than one head").
    subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; DagsterInstance.get().dispose()"],
                   env=env, check=True, timeout=300, capture_output=True)
    # Then `make ui`, which starts up while the CLI materialises (they share the instance).
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "ui"], cwd=REPO_ROOT, env=env, stdout=log_fh, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_reset_signals,
    )
    try:
        cli = subprocess.run(
            [sys.executable, "-m", "kspill_pipeline.cli", "run", "--select", CLI_SELECT],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        (ARTIFACTS / "kspill_run.log").write_text(cli.stdout + "\n" + cli.stderr, encoding="utf-8")
        if cli.returncode != 0:
            pytest.fail(f"`kspill run --select '{CLI_SELECT}'` failed (exit {cli.returncode}):\n"
                        f"{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}")
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`make ui` exited with {proc.returncode} before serving:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(base + "/server_info", timeout=5) as r:
                    if r.status == 200 and "dagster_webserver_version" in json.loads(r.read()):
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev not serving {base}/server_info after {SERVER_START_TIMEOUT}s:\n{_tail(log)}")
            time.sleep(1)
        yield {"base": base, "port": port, "data": data, "store": store, "home": home, "proc": proc, "log": log}
    finally:
        _stop_group(proc)
        log_fh.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        p = Path(f)
        if not p.exists():
            continue
        for line in p.read_text().splitlines()[1:]:
            parts = line.split()
            addr, port_hex = parts[1].split(":")
            if parts[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                out.add(addr)
    return out


def test_make_ui_listens_on_loopback_only(ui):
    """`make ui` serves on 127.0.0.1 only: no socket on the port listens on 0.0.0.0 or ::."""
    addrs = _listening_addresses(ui["port"])
    assert addrs, f"nothing listens on port {ui['port']}"
    assert addrs == {"0100007F"}, f"port {ui['port']} listens on {addrs} (hex), expected 127.0.0.1 only"
    # and the dagster dev process of the target was given the project's workspace.yaml
    cmdlines = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == ui["proc"].pid:
                    cmdlines.append((d / "cmdline").read_bytes().split(b"\0"))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
    dev = [c for c in cmdlines if b"dev" in c and any(x.endswith(b"dagster") for x in c)]
    assert dev, f"no `dagster dev` process in the make ui process group: {cmdlines}"
    args = [a.decode() for a in dev[0]]
    assert args[args.index("-w") + 1] == "workspace.yaml" and args[args.index("-h") + 1] == "127.0.0.1"


class _Steps:
    """Named UI steps: a screenshot after each; screenshot, HTML and trace when one fails."""

    def __init__(self, page, context, log: Path):
        self.page, self.context, self.log = page, context, log
        self.update_docs = os.environ.get("KSPILL_UPDATE_SCREENSHOTS") == "1"

    def shot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        if self.update_docs:
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SHOTS / path.name)
        return path

    @contextmanager
    def step(self, name: str):
        try:
            yield
        except Exception as e:
            try:
                self.page.screenshot(path=str(ARTIFACTS / f"FAILED_{name}.png"), full_page=True)
                (ARTIFACTS / f"FAILED_{name}.html").write_text(self.page.content(), encoding="utf-8")
                self.context.tracing.stop(path=str(ARTIFACTS / "trace.zip"))
            except Exception:  # noqa: BLE001 - keep the original error
                pass
            raise AssertionError(
                f"UI step {name!r} failed at {self.page.url}: {e}\n"
                f"Artifacts: {ARTIFACTS} (FAILED_{name}.png/.html, trace.zip)\n"
                f"dagster dev log tail:\n{_tail(self.log, 25)}"
            ) from e
        self.shot(name)


def _expected_checks(ui) -> set[str]:
    from dagster import AssetKey

    from kspill_pipeline.definitions import build_definitions

    graph = build_definitions(ui["data"], ui["store"]).resolve_asset_graph()
    return {k.name for k in graph.get_check_keys_for_assets({AssetKey("trade_clean")})}


def test_browser_materialise_check_and_figure(ui):
    from playwright.sync_api import expect, sync_playwright

    base = ui["base"]
    expected_checks = _expected_checks(ui)
    assert len(expected_checks) >= 5, expected_checks
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.tracing.start(screenshots=True, snapshots=True)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.set_default_navigation_timeout(UI_TIMEOUT_MS)
        st = _Steps(page, context, ui["log"])
        try:
            with st.step("01_lineage"):
                page.goto(base + "/")
                page.get_by_role("link", name="Lineage").click()
                expect(page.get_by_text("Global asset lineage")).to_be_visible()
                for group in ("raw", "trade", "relatedness", "s000"):
                    expect(page.get_by_text(group, exact=True).first).to_be_visible()

            with st.step("02_trade_group"):
                page.get_by_label("Search and filter assets").focus()
                page.keyboard.type('group:"trade"')
                page.keyboard.press("Enter")
                node = page.get_by_text("trade_clean", exact=True)
                expect(node.last).to_be_visible()
                # the CLI's materialisations (same instance) fill every year of the group's assets
                expect(page.get_by_text("100% filled").first).to_be_visible()
                expect(page.get_by_text(f"{YEARS[1] - YEARS[0] + 1} partitions").first).to_be_visible()

            with st.step("03_trade_clean_asset"):
                node.last.click()  # the side panel of the selected node links to the asset page
                page.get_by_role("link", name="View in Asset Catalog").click()
                page.wait_for_url(re.compile(r"/assets/trade_clean"))
                materialize = page.get_by_role("button", name=re.compile(r"Materialize(…|\.\.\.)?$"))
                expect(materialize.first).to_be_enabled()
                expect(page.get_by_text("Row count")).to_be_visible()

            with st.step("04_partition_dialog"):
                materialize.first.click()
                expect(page.get_by_role("dialog").first).to_be_visible()
                # trade_clean is one output of the non-subsettable cleaning multi-asset: confirm siblings
                confirm = page.get_by_role("dialog").filter(has_text="Additional assets will be materialized")
                if confirm.count():
                    expect(confirm).to_contain_text("trade_quarantine")
                    confirm.get_by_role("button", name="Confirm").click()
                dialog = page.get_by_role("dialog").filter(has_text="Partition selection")
                expect(dialog).to_be_visible()
                expect(confirm).to_have_count(0)
                years_input = dialog.get_by_placeholder(re.compile(r"^ex: "))
                years_input.fill(UI_YEAR)
                years_input.press("Enter")
                expect(dialog).to_contain_text("1 partition")
                launch = dialog.get_by_role("button", name=re.compile(r"Launch (1 )?run$"))
                expect(launch).to_be_enabled()

            with st.step("05_run_success"):
                launch.click()
                expect(page.get_by_role("dialog")).to_have_count(0)
                view = page.get_by_role("link", name="View", exact=True)
                expect(view.first).to_be_visible()
                href = view.first.get_attribute("href") or ""
                m = re.search(r"/runs/([0-9a-f-]{36})", href)
                assert m, f"toast link {href!r} is not a run page"
                run_id = m.group(1)
                view.first.click()
                page.wait_for_url(re.compile(rf"/runs/{run_id}"))
                run = _wait_run(base, run_id)
                tags = {t["key"]: t["value"] for t in run["tags"]}
                assert tags.get("dagster/partition") == UI_YEAR, tags
                assert run["status"] == "SUCCESS", (
                    f"run {run_id} ended {run['status']}:\n{_run_errors(base, run_id)}")
                expect(page.get_by_text("Success", exact=True).first).to_be_visible()
                expect(page.get_by_text(f"partition: {UI_YEAR}")).to_be_visible()
                expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible()

            with st.step("06_checks_passed"):
                page.goto(base + "/assets/trade_clean")
                page.get_by_role("tab", name="Checks").click()
                page.wait_for_url(re.compile(r"view=checks"))
                expect(page.get_by_text(f"Checks ({len(expected_checks)})")).to_be_visible()
                for name in sorted(expected_checks):
                    expect(page.get_by_text(name, exact=True).first).to_be_visible()
                expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(expected_checks))
                expect(page.get_by_text(re.compile(r"^(Failed|Execution failed|Not evaluated)$", re.I))
                       ).to_have_count(0)
                # the latest evaluations come from the run launched in step 5
                page.get_by_role("tab", name="Execution history").click()
                expect(page.locator(f'a[href^="/runs/{run_id}"]').first).to_be_visible()
                page.get_by_role("tab", name="Overview").last.click()
                expect(page.get_by_text("Passed", exact=True).first).to_be_visible()

            with st.step("07_s000_figure1"):
                page.goto(base + "/assets/s000_figure1")
                expect(page.get_by_text("s000_figure1", exact=True).first).to_be_visible()
                row = page.get_by_role("row").filter(has=page.get_by_text("figure", exact=True))
                row.get_by_text("[Show Markdown]").first.click()
                dialog = page.get_by_role("dialog")
                img = dialog.get_by_role("img", name="Figure 1")
                expect(img).to_be_visible()
                expect(dialog).to_contain_text("Figure 1.")
                page.wait_for_function(
                    "el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
                src = img.get_attribute("src") or ""
                assert src.startswith("data:image/png;base64,"), src[:60]
                shown = base64.b64decode(src.split(",", 1)[1])
                on_disk = (ui["store"] / "s000_figure1" / "figure.png").read_bytes()
                assert shown == on_disk, "the figure shown in the UI is not the PNG written to the store"
        finally:
            try:
                context.tracing.stop()
            except Exception:  # noqa: BLE001 - already stopped after a failure
                pass
            browser.close()
