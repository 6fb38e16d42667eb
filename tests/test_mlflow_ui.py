"""What the suite logs reads right in the MLflow UI itself: three tiny real runs (`reproduce train`
on synthetic input: plain20 seed 0, resnet20 seeds 0 and 1), a real `mlflow server` over their
store, and headless Chromium (Debian's, driven by selenium) on two pages:

  #/experiments/<id>/runs?workflowType=machine_learning   the runs table ("Model training"; without
                                                          the parameter a fresh browser opens GenAI)
  #/compare-runs?runs=[...]&experiments=[...]             the compare page of the three runs

The expected values come from the store (MlflowClient), the shown ones from the page; each page is
saved as a screenshot in the test's tmp_path. Routes and selectors are MLflow 3.17's UI.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO, run_cli
from tests.test_faults_tracking import _free_port, _start_server, _stop_server
from tests.test_readme import TINY

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"  # a skip reason tests/conftest.py knows
RUNS = [("plain20", 0), ("resnet20", 0), ("resnet20", 1)]  # (config, seed): run names plain20-s0, ...
PARAMS = ("model.name", "model.depth")  # compare-page rows checked against the store, run by run
METRIC = "test_top1_err"
LOAD_S = 90  # a React app: the first load compiles its JS, slow on 2 busy cores

# Reads the compare page in one go: every table row headed by a <th> (the run ID / name header
# rows, the params, the tags) as {header: [cell per run]}, and the metrics, which sit in two
# virtualized grids (names left, values right) and pair up only by their on-screen row.
READ_COMPARE = """
const rows = {};
for (const tr of document.querySelectorAll('tr')) {
  const cells = [...tr.children];
  if (cells.length > 1 && cells[0].tagName === 'TH')
    rows[cells[0].innerText.trim()] = cells.slice(1).map(c => c.innerText.trim());
}
const metrics = {};
for (const link of document.querySelectorAll('a[title="Plot chart"]')) {
  const names = link.closest('[role=grid]');
  let box = names.parentElement;
  while (box && box.querySelectorAll('[role=grid]').length < 2) box = box.parentElement;
  if (!box) continue;
  const top = link.parentElement.getBoundingClientRect().top;
  const values = [...box.querySelectorAll('[role=grid]')].filter(g => g !== names)
    .flatMap(g => [...g.querySelectorAll('[role=rowgroup] > div')])
    .filter(c => Math.abs(c.getBoundingClientRect().top - top) < 2)
    .sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left);
  metrics[link.innerText.trim()] = values.map(c => c.innerText.trim());
}
return {rows, metrics};
"""


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium from Debian's packages, its driver named explicitly: selenium's own
    driver lookup (Selenium Manager) would download a browser from the internet."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="could not import 'selenium': pip install -e '.[test]'"
    )
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is absent: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1100",
    ):
        options.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
        options=options,
    )
    driver.set_page_load_timeout(LOAD_S)
    yield driver
    driver.quit()


def _train(config: str, seed: int, tmp_path: Path) -> None:
    done = run_cli(
        "train",
        "--config",
        str(REPO / "configs" / "cifar10" / f"{config}.yaml"),
        f"seed={seed}",
        "data.synthetic=true",
        *TINY,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{config} seed {seed}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _page_text(driver) -> str:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text[:3000]
    except WebDriverException as err:  # the page text is for the failure message only
        return f"(no page text: {err})"


def _wait(driver, what: str, condition, shot: Path):
    """condition(driver) once it is truthy, within LOAD_S; else a screenshot and the page text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, LOAD_S, poll_frequency=0.5).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(shot))
        raise AssertionError(
            f"{what}: not on {driver.current_url} within {LOAD_S} s (screenshot {shot}); "
            f"the page reads:\n{_page_text(driver)}"
        ) from None


def _compare_problems(page: dict, runs: dict) -> list[str]:
    """What the compare page shows wrong or not at all, against the store's runs."""
    rows, metrics = page["rows"], page["metrics"]
    order = rows.get("Run ID:", [])  # the page's column order
    if sorted(order) != sorted(runs):
        return [f"the columns are runs {order}, not {sorted(runs)}"]
    problems = []
    shown_names = rows.get("Run Name:")
    if shown_names != [runs[i].info.run_name for i in order]:
        problems.append(f"run names {shown_names}, stored {[runs[i].info.run_name for i in order]}")
    for key in PARAMS:
        stored = [runs[i].data.params.get(key) for i in order]
        if stored == [None] * len(order):
            problems.append(f"param {key}: the runs carry no such param, so no page can show it")
        elif key not in rows:
            problems.append(f"no param row {key!r} (stored: {stored})")
        elif rows[key] != stored:
            problems.append(f"param {key} reads {rows[key]}, stored {stored}")
    stored = [runs[i].data.metrics[METRIC] for i in order]
    shown = metrics.get(METRIC)
    try:
        if shown is None or [float(v) for v in shown] != pytest.approx(
            stored, rel=1e-3
        ):  # the UI shows 4 significant digits
            problems.append(f"metric {METRIC} reads {shown}, stored {stored}")
    except ValueError:
        problems.append(f"metric {METRIC} reads {shown}, not numbers; stored {stored}")
    return problems


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_ui_shows_runs_and_comparison(browser, tmp_path):
    driver, store, port = browser, tmp_path / "mlflow.db", _free_port()  # the store conftest's `isolated` points at
    _train(
        *RUNS[0], tmp_path
    )  # alone: it makes the store's tables and the experiment, which concurrent first writers race on
    pool = ThreadPoolExecutor(3)
    starting = pool.submit(_start_server, store, port)  # about 10 s, beside the other two runs (1 thread each)
    try:
        for training in [pool.submit(_train, *run, tmp_path) for run in RUNS[1:]]:
            training.result()
        starting.result()
        url = f"http://127.0.0.1:{port}"
        client = mlflow.MlflowClient(url)  # the server's view of the store, as the UI gets it
        experiment = client.get_experiment_by_name("cifar10")
        runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
        names = {run_id: r.info.run_name for run_id, r in runs.items()}
        assert sorted(names.values()) == sorted(f"{c}-s{s}" for c, s in RUNS), names

        # (a) the runs table, as the README's link opens it (the UI's GenAI / Model training switch is a
        # setting of the browser, GenAI by default); each run's name links to that run's page
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
        shot = tmp_path / "runs.png"

        def linked_names(d):
            links = d.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(a => [a.getAttribute('href'), a.innerText.trim()]);",
                f'a[href*="/experiments/{experiment.experiment_id}/runs/"]',
            )
            shown = {href.rsplit("/", 1)[-1]: text for href, text in links if text}
            return shown if all(shown.get(i) == n for i, n in names.items()) else None

        _wait(driver, f"the runs table with {sorted(names.values())}", linked_names, shot)
        driver.save_screenshot(str(shot))

        # (b) the compare page: names, params and the final error, run by run
        ids = list(runs)
        driver.get(
            f"{url}/#/compare-runs?runs={json.dumps(ids, separators=(',', ':'))}"
            f"&experiments={json.dumps([experiment.experiment_id])}"
        )
        shot = tmp_path / "compare.png"

        def compare_page(d):  # rendered: the run names, the first param's row and the metric's values
            page = d.execute_script(READ_COMPARE)
            return (
                page
                if page["rows"].get("Run Name:") and page["rows"].get(PARAMS[0]) and page["metrics"].get(METRIC)
                else None
            )

        page = _wait(driver, f"the compare page with its run names, {PARAMS[0]} and {METRIC}", compare_page, shot)
        driver.save_screenshot(str(shot))
        # Scrolled to the params' row (the table scrolls as one) and to the metrics' grid as a whole: scrolling
        # to a metric's name would scroll the names grid alone, out of line with the values in the picture.
        for selector, key, name in (
            ("th", "model.depth", "compare-params.png"),
            ('a[title="Plot chart"]', METRIC, "compare-metrics.png"),
        ):
            driver.execute_script(
                """for (const el of document.querySelectorAll(arguments[0]))
                                       if (el.innerText.trim() === arguments[1]) {
                                         (el.closest('[role=grid]') || el).scrollIntoView({block: 'center'}); break; }""",
                selector,
                key,
            )
            driver.save_screenshot(str(tmp_path / name))
        problems = _compare_problems(page, runs)
        assert not problems, (
            f"the compare page ({driver.current_url}, screenshots in {tmp_path}):\n  "
            + "\n  ".join(problems)
            + f"\nthe page reads:\n{_page_text(driver)}"
        )
    finally:
        pool.shutdown(wait=True)
        if starting.exception() is None:
            _stop_server(starting.result())
