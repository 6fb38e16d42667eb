"""What the suite logs reads right in the MLflow UI itself: a tiny real sweep (`reproduce sweep` on
synthetic input: plain20 and resnet20, seeds 0 and 1, so one parent run with four training runs nested
under it), a real `mlflow server` over its store, and headless Chromium (Debian's, driven by
selenium) on three pages:

  #/experiments/<id>/runs/<parent id>                     the sweep's parent run: per network the mean
                                                          and std over seeds, n, and the findings' margins
  #/experiments/<id>/runs?workflowType=machine_learning   the runs table ("Model training"; without the
    &searchFilter=tags.reproduce.kind = 'train'           parameter a fresh browser opens GenAI), filtered
    &orderByKey=metrics.`errors/test_top1_err`            to the training runs and sorted by test error:
                                                          exactly the four, flat
  #/compare-runs?runs=[...]&experiments=[...]             the compare page of the training runs
  #/experiments/<id>/runs/<run id>/model-metrics          a training run's charts: the errors first

The expected values come from the store (MlflowClient) and are recomputed from the training runs'
own metrics, the shown ones from the page; each page is saved as a screenshot in the test's
tmp_path. Routes and selectors are MLflow 3.17's UI; the README's walk-through says the same.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO, run_cli
from tests.test_faults_tracking import _free_port, _start_server, _stop_server
from tests.test_readme import TINY

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"  # a skip reason tests/conftest.py knows
CONFIGS, SEEDS = ("plain20", "resnet20"), (0, 1)  # run names plain20-s0, ...; the parent sweep-plain20-resnet20
PARAMS = ("model.name", "model.depth")  # compare-page rows checked against the store, run by run
METRIC = "test_top1_err"
LOAD_S = 90  # a React app: the first load compiles its JS, slow on 2 busy cores
TRAINING = "tags.reproduce.kind = 'train'"  # the README's filter: exactly the training runs

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


def _sweep(tmp_path: Path) -> None:
    configs = [str(REPO / "configs" / "cifar10" / f"{c}.yaml") for c in CONFIGS]
    seeds = [str(s) for s in SEEDS]
    done = run_cli(
        "sweep",
        "--configs",
        *configs,
        "--seeds",
        *seeds,
        "data.synthetic=true",
        "run.log_every=1",
        *TINY,
        cwd=tmp_path,
        timeout=540,
    )
    assert done.returncode == 0, f"the sweep:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _page_text(driver, limit: int | None = 3000) -> str:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text[:limit]
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


def _shown_metrics(driver) -> dict[str, str] | None:
    """A run page's Metrics table (Overview tab) as {name: value as shown}, or None before it is drawn."""
    text = _page_text(driver, limit=None)
    if "\nMetric\nValue\n" not in text or "\nParameters (" not in text:
        return None
    rows = text.split("\nMetric\nValue\n", 1)[1].split("\nParameters (", 1)[0].splitlines()
    return dict(zip(rows[::2], rows[1::2]))


def _sections(driver) -> list[str]:
    """The chart sections of a run's Model metrics tab, top to bottom: each a line with its name and
    then one with its number of charts, "(3)" (or both on one line, "errors (3)")."""
    lines = _page_text(driver, limit=None).splitlines()
    found = []
    for line, after in zip(lines, [*lines[1:], ""]):
        if glued := re.fullmatch(r"(.+?) \(\d+\)", line):
            found.append(glued.group(1))
        elif re.fullmatch(r"\(\d+\)", after):
            found.append(line)
    return found


def _expected_summary(client, runs: dict) -> dict[str, float]:
    """The parent's summary recomputed from its training runs' own metrics: per network n, mean and
    sample std of the final test error and of the training error over the last fifth of the run,
    and the margin of plain20 over resnet20 (residual learning at 20 layers)."""
    import statistics

    def train_error(run) -> float:
        last = int(run.data.params["schedule.iterations"]) * 0.8
        tail = [m.value for m in client.get_metric_history(run.info.run_id, "train_top1_err") if m.step > last]
        return sum(tail) / len(tail)

    expected, means = {}, {}
    for model in CONFIGS:
        mine = [r for r in runs.values() if r.data.tags["reproduce.model"] == model]
        expected[f"{model}/n"] = len(mine)
        for kind, values in (
            ("test", [r.data.metrics["test_top1_err"] for r in mine]),
            ("train", list(map(train_error, mine))),
        ):
            means[model, kind] = expected[f"{model}/{kind}_err_mean"] = statistics.mean(values)
            expected[f"{model}/{kind}_err_std"] = statistics.stdev(values)
    for kind in ("train", "test"):
        expected[f"margin/plain20-resnet20/{kind}_err"] = means["plain20", kind] - means["resnet20", kind]
    return expected


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_ui_shows_the_study_the_training_runs_and_their_comparison(browser, tmp_path):
    driver, store, port = browser, tmp_path / "mlflow.db", _free_port()  # the store conftest's `isolated` points at
    _sweep(tmp_path)
    server = _start_server(store, port)
    try:
        url = f"http://127.0.0.1:{port}"
        client = mlflow.MlflowClient(url)  # the server's view of the store, as the UI gets it
        experiment = client.get_experiment_by_name("cifar10")
        runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], filter_string=TRAINING)}
        names = {run_id: r.info.run_name for run_id, r in runs.items()}
        assert sorted(names.values()) == sorted(f"{c}-s{s}" for c in CONFIGS for s in SEEDS), names
        (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.reproduce.kind = 'study'")
        assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}

        # (a) the parent run's page: the summary over seeds, as the store holds it and as recomputed from its runs
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}")
        shot = tmp_path / "parent.png"
        shown = _wait(
            driver,
            "the parent run's metrics table",
            lambda d: (m := _shown_metrics(d)) and len(m) == len(parent.data.metrics) and m,
            shot,
        )
        driver.save_screenshot(str(shot))
        expected = _expected_summary(client, runs)
        wrong = {
            key: (shown.get(key), value)
            for key, value in expected.items()
            if shown.get(key) is None or float(shown[key]) != pytest.approx(value, abs=1.5e-4)  # 4 decimals stored
        }
        assert not wrong, f"the parent run's page (screenshot {shot}) shows {{metric: (shown, expected)}}: {wrong}"
        assert "Child runs" in _page_text(driver, limit=None)

        # (b) the runs table, filtered to the training runs and sorted by test error (a sort other than by
        # date shows no parent rows): exactly the training runs, each name linking to its run's page
        query = urllib.parse.urlencode(
            {
                "workflowType": "machine_learning",
                "searchFilter": TRAINING,
                "orderByKey": "metrics.`errors/test_top1_err`",
                "orderByAsc": "true",
            }
        )
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs?{query}")
        shot = tmp_path / "training-runs.png"

        def linked_names(d):
            links = d.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(a => [a.getAttribute('href'), a.innerText.trim()]);",
                f'a[href*="/experiments/{experiment.experiment_id}/runs/"]',
            )
            shown = {href.rsplit("/", 1)[-1]: text for href, text in links if text}
            return shown if f"{len(names)} matching runs" in _page_text(d) and shown == names else None

        _wait(driver, f"the runs table with exactly {sorted(names.values())}", linked_names, shot)
        driver.save_screenshot(str(shot))
        _check_compare_page(driver, url, experiment, runs, tmp_path)

        # (d) a training run's charts: the section of the errors (errors/*) comes before the other model metrics
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{next(iter(runs))}/model-metrics")
        shot = tmp_path / "charts.png"
        sections = _wait(
            driver,
            "the run's chart sections",
            lambda d: {"errors", "Model metrics"} <= set(s := _sections(d)) and s,
            shot,
        )
        driver.save_screenshot(str(shot))
        assert sections.index("errors") < sections.index("Model metrics"), (
            f"chart sections {sections} (screenshot {shot})"
        )
    finally:
        _stop_server(server)


def _check_compare_page(driver, url: str, experiment, runs: dict, tmp_path: Path) -> None:
    """(c) the compare page of the training runs: names, params and the final error, run by run."""
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
