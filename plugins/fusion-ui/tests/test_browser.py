"""The page in a real browser (headless Chromium via Selenium): compose TIES on mini, change density and see
the command follow, see the core's error for a bad value, dry-run, find the template plugin's method with its
field, and open a stored run on the Results page.  ``FUSE_UI_SCREENSHOTS=1`` also writes the two screenshots
of the plugin README into ``docs/``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and PyPI's ``selenium``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TASKS = ("rt_sentiment", "rt_subjectivity", "debate_party", "convention_party", "chatter_topic", "language_id")
# per-task accuracy of the README's `fuse run` table (pretrained, individual, ties on mini)
PRETRAINED = (0.643, 0.550, 0.298, 0.516, 0.509, 0.633)
INDIVIDUAL = (0.743, 0.922, 0.693, 0.620, 0.867, 0.958)
TIES = (0.695, 0.752, 0.466, 0.589, 0.747, 0.950)


def make_db(path):
    """Two stored runs (ties density 0.2 and 0.4) and their baselines, through the DB module's API."""
    from fusion_ui.store import _db

    ties_04 = tuple(round(v - 0.02, 3) for v in TIES)
    with _db.open_db(path) as db:
        for density, values in ((0.2, TIES), (0.4, ties_04)):
            config = {"method": {"name": "ties", "density": density, "scaling_factor": 1.0, "weights": None},
                      "modelpool": {"name": "minibench"}, "taskpool": {"name": "minibench"},
                      "device": "cpu", "compute_dtype": "float32", "seed": 0, "benchmark": "mini"}
            rows = {"merged": values, "pretrained": PRETRAINED, "individual": INDIVIDUAL}
            report = {"primary_metric": "accuracy",
                      "results": {k: {t: {"accuracy": v} for t, v in zip(TASKS, vs, strict=True)} for k, vs in rows.items()},
                      "versions": {"python": "3.11", "fusion-core": "0.1.0", "torch": "2.13.0"},
                      "timings": {"setup": 1.4, "prepare": 0.1, "method": 1.9, "evaluate": 0.4}, "duration_s": 3.8}
            _db.store_report(db, report, config, summary="" if density == 0.2 else f"density={density:g}",
                             source="bench", benchmark="mini")
    return path


@pytest.fixture
def server(tmp_path):
    """``fuse ui --port 0`` in a child process; yields its URL (the first line it prints)."""
    db = make_db(tmp_path / "results.sqlite")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fusion_core", "ui", "--port", "0", "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fuse ui: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        print(f"fuse ui printed its URL after {time.perf_counter() - started:.2f}s")
        yield line.split()[2]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1360,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_text(driver, element_id, predicate, timeout=30):
    """Wait until ``predicate(text of #element_id)``; returns that text."""
    WebDriverWait(driver, timeout).until(lambda d: predicate(d.find_element(By.ID, element_id).text))
    return driver.find_element(By.ID, element_id).text


def set_field(driver, element_id, text):
    """Replace a text field's value as a person would (select all, then type), firing input events."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, element_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(text or Keys.BACKSPACE)


def screenshot(driver, name, height):
    if os.environ.get("FUSE_UI_SCREENSHOTS") == "1":
        driver.set_window_size(1360, height)
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(0.3)
        driver.save_screenshot(str(DOCS / name))


def test_compose_validate_dry_run_and_results_in_chromium(server, browser):
    started = time.perf_counter()
    browser.get(server)
    wait_text(browser, "command", lambda t: t.startswith("fuse run benchmark=mini"))
    method = Select(browser.find_element(By.ID, "method"))

    # the template plugin's method is listed under its plugin, with its field
    template = browser.find_elements(By.CSS_SELECTOR, "#method optgroup[label='plugin example'] option")
    assert template, "the template plugin's method is not in the page"
    method.select_by_value(template[0].get_attribute("value"))
    WebDriverWait(browser, 10).until(ec.presence_of_element_located((By.ID, "f-method-use_base")))
    assert "example_median" in browser.find_element(By.ID, "method-info").text

    # a default that depends on another field too: FusionBench's DARE λ is 0.5 for variant ties
    method.select_by_value("dare")
    wait_text(browser, "command", lambda t: t.endswith("method=dare"))
    assert "FusionBench's fusion_bench_config/method/dare/task_arithmetic.yaml" in browser.find_element(By.ID, "method-info").text
    scaling = browser.find_element(By.ID, "f-method-scaling_factor")
    assert scaling.get_attribute("placeholder") == "0.3 (convention fusionbench)"
    Select(browser.find_element(By.ID, "f-method-variant")).select_by_value("ties")
    assert scaling.get_attribute("placeholder") == "0.5 (convention fusionbench)"
    wait_text(browser, "command", lambda t: t == "fuse run benchmark=mini method=dare method.variant=ties")

    # ties on mini: the fields its convention fills are empty and show the value it gives them
    method.select_by_value("ties")
    assert wait_text(browser, "command", lambda t: t.endswith("method=ties")) == "fuse run benchmark=mini method=ties"
    density = browser.find_element(By.ID, "f-method-density")
    assert density.get_attribute("value") == ""  # unset: the convention (FusionBench by default) fills it
    assert density.get_attribute("placeholder") == "0.2 (convention fusionbench)"
    assert browser.find_element(By.ID, "default-method-density").text == \
        "default: 0.2 (convention fusionbench; mergekit: 1.0, paper: 0.2)"
    trim = Select(browser.find_element(By.ID, "f-method-trim"))
    assert trim.first_selected_option.text == "model (convention fusionbench)"
    # another convention: the shown defaults follow it, the command adds the convention alone
    convention = Select(browser.find_element(By.ID, "f-method-convention"))
    convention.select_by_value("mergekit")
    wait_text(browser, "command", lambda t: t == "fuse run benchmark=mini method=ties method.convention=mergekit")
    assert density.get_attribute("placeholder") == "1.0 (convention mergekit)"
    assert browser.find_element(By.ID, "default-method-density").text == \
        "default: 1.0 (convention mergekit; fusionbench: 0.2, paper: 0.2)"
    assert trim.first_selected_option.text == "tensor (convention mergekit)"
    convention.select_by_value("fusionbench")
    wait_text(browser, "command", lambda t: t == "fuse run benchmark=mini method=ties")
    assert density.get_attribute("placeholder") == "0.2 (convention fusionbench)"

    # change density and see the command follow
    set_field(browser, "f-method-density", "0.35")
    wait_text(browser, "command", lambda t: t == "fuse run benchmark=mini method=ties method.density=0.35")
    assert "density: 0.35" in browser.find_element(By.ID, "yaml").text
    assert "--set density=0.35" in browser.find_element(By.ID, "merge-command").text

    # a bad value: the core's message next to the field, the dry run disabled
    set_field(browser, "f-method-density", "1.5")
    message = wait_text(browser, "error-method-density", lambda t: "must be in" in t)
    assert message.startswith("method: density must be in [0") and message.endswith("got 1.5")
    assert not browser.find_element(By.ID, "dry-run").is_enabled()
    set_field(browser, "f-method-density", "0.35")
    wait_text(browser, "error-method-density", lambda t: t == "")

    # a misspelled key among the extra arguments: the core's "did you mean"
    set_field(browser, "extra-overrides", "method.densty=0.5")
    assert wait_text(browser, "error-extra-overrides", lambda t: "did you mean" in t) == \
        "unknown field method.densty (did you mean 'density'?)"
    set_field(browser, "extra-overrides", "")
    wait_text(browser, "error-extra-overrides", lambda t: t == "")

    # the dry run, in the server process
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "dry-run").is_enabled())
    browser.find_element(By.ID, "dry-run").click()
    plan = wait_text(browser, "dry-run-output", lambda t: "nothing was loaded" in t or t.startswith("error"), timeout=60)
    assert "nothing was loaded" in plan and "density: 0.35" in plan and "roget_category" in plan
    assert browser.find_element(By.ID, "run-start").is_displayed()  # served on 127.0.0.1: runs may start here
    screenshot(browser, "compose.png", 1320)

    # results: the leaderboard, then one stored run with its per-task plot and provenance
    browser.get(server + "#results")
    board = wait_text(browser, "leaderboard", lambda t: "individual" in t)
    assert "52.5" in board and "70.0" in board  # pretrained and ties averages of the README table, in percent
    assert "none yet" in wait_text(browser, "reports", lambda t: "run" in t)  # no fuse run report in runs/ here
    run_link = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr:not(.baseline) a.run-link")[-1]
    run_link.click()
    wait_text(browser, "run-title", lambda t: t.startswith("Run "))
    bars = browser.find_elements(By.CSS_SELECTOR, "#run-plot svg rect")
    assert len(bars) >= 3 * len(TASKS)  # method, pretrained, individual on each task (+ legend swatches)
    meta = browser.find_element(By.ID, "run-meta").text
    assert "time: method 1.90 s" in meta and "version: torch 2.13.0" in meta
    browser.find_element(By.ID, "diff-button").click()
    assert "method.density" in wait_text(browser, "diff", lambda t: "density" in t or "identical" in t)
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "results.png", 2000)
    print(f"browser test steps took {time.perf_counter() - started:.1f}s")
