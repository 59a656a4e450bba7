"""The notebooks as a JupyterLab user sees them: a headless JupyterLab on a free local port, driven by
Selenium in Debian's headless Chromium. train.ipynb is run with Run All Cells on the project's kernel and
its live figure is watched updating; the explorer is opened on a small sweep and its selection changed.

A screenshot of each step goes to the test's temp folder, and to $AMP_TEST_ARTEFACTS when that is set.
Where Chromium is missing, it is installed with apt-get when we are root; the tests skip (saying why)
only where that cannot be done.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from factories import eval_curve, history, make_result

from amp_lib import explore, figstyle

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).parent / "jupyter"
KERNEL_DISPLAY_NAME = "AMP Workbook (Python 3)"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in the front tab
# train.ipynb's run in the browser: fp16 (with a loss scale that starts too high, so steps are skipped)
# for long enough that the live figure redraws a few times, W&B off.
TRAIN_PARAMETERS = {
    "precision": "fp16-mixed",
    "allow_slow": True,
    "steps": 24,
    "log_every": 2,
    "eval_every": 8,
    "timing_warmup_steps": 2,
    "batch_size": 4,
    "seq_len": 32,
    "init_scale": 2.0**20,
    "wandb_mode": "disabled",
}


# --- the browser and the server -----------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get if missing and we may; else a skip."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium: {' '.join(command)} failed: {done.stderr.strip()[-300:]}")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("apt-get installed chromium but chromium/chromedriver are still not on PATH")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The pids a process started (kernels), read from /proc: to check none is left behind."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Lab:
    url: str
    token: str
    folder: Path  # the server's root: a copy of notebooks/
    process: subprocess.Popen[bytes]

    def page(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?reset&token={self.token}"  # reset: no tab of an earlier test


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab on a free port over a copy of notebooks/, its config, settings and runtime in temp folders;
    stopped by pid at the end, and checked to leave no kernel behind."""
    root = tmp_path_factory.mktemp("lab")
    folder = root / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns("conftest.py", "__pycache__"))
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "IPYTHONDIR": str(root / "ipython"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    port, token = _free_port(), secrets.token_hex(16)
    # fmt: off
    command = [str(JUPYTER), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
               "--MappingKernelManager.default_kernel_name=amp-workbook"]  # fmt: skip
    # fmt: on
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = (root / "lab.log").open("wb")
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Lab(f"http://127.0.0.1:{port}", token, folder, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert process.poll() is None, f"jupyter lab exited: {(root / 'lab.log').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "jupyter lab did not answer within 60 s"
                time.sleep(0.2)
        yield server
    finally:
        started = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in started if _alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind by jupyter lab: {left}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    service = Service(executable_path=driver_path)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        assert service.process is None or service.process.poll() is not None, "chromedriver left running"


@pytest.fixture
def screenshot(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Path]]:
    """`screenshot(step)`: a PNG of the page now, in tmp_path and in $AMP_TEST_ARTEFACTS if set; one more
    ("last") when the test ends, passed or not, so a failure shows where the page was."""
    target = os.environ.get("AMP_TEST_ARTEFACTS")

    def take(step: str, at: str = "") -> Path:
        """`at`: the CSS selector of an element to scroll into view first."""
        from selenium.webdriver.common.by import By

        for element in browser.find_elements(By.CSS_SELECTOR, at)[:1] if at else []:
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        path = tmp_path / f"{request.node.name}-{step}.png"
        browser.save_screenshot(str(path))
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    yield take
    take("last")


# --- helpers that act on the page ---------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll)


def with_parameters(folder: Path, name: str, copy: str, values: dict[str, Any]) -> str:
    """A copy of a notebook with a cell after its parameters cell that sets `values` (as papermill injects them)."""
    nb = nbformat.read(folder / name, as_version=4)
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    nbformat.write(nb, folder / copy)
    return copy


def open_notebook(browser: Any, lab: Lab, path: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(lab.page(path))
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell"), 60, f"{path} to open")
    wait_for(
        lambda: (
            KERNEL_DISPLAY_NAME in "".join(texts(browser, ".jp-NotebookPanel-toolbar"))
            and "Idle" in "".join(texts(browser, "#jp-main-statusbar"))
        ),
        60,
        "the project's kernel to be ready",
    )


def run_all_cells(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    (menu,) = [e for e in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if e.text.strip() == "Run"]
    menu.click()
    item = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, 'li.lm-Menu-item[data-command="runmenu:run-all"]'),
        10,
        "Run All Cells in the Run menu",
    )
    item[0].click()


def cells_done(browser: Any) -> bool:
    """Every code cell ran (a number in its prompt, no [*])."""
    prompts = texts(browser, f"{PANEL} .jp-CodeCell .jp-InputPrompt")
    return bool(prompts) and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts)


def errors(browser: Any) -> list[str]:
    stderr = texts(browser, f'{PANEL} [data-mime-type="application/vnd.jupyter.stderr"]')
    return [text for text in stderr if "Error" in text]


def texts(browser: Any, css: str, read: Callable[[Any], str] = lambda element: element.text) -> list[str]:
    """`read` (the text by default) of each element matching `css`, read again if JupyterLab redraws an output
    between finding and reading it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            return [read(e) for e in browser.find_elements(By.CSS_SELECTOR, css)]
        except StaleElementReferenceException:
            time.sleep(0.1)
    return [read(e) for e in browser.find_elements(By.CSS_SELECTOR, css)]


def image_sources(browser: Any, css: str) -> list[str]:
    return texts(browser, f"{css} img", read=lambda element: element.get_attribute("src"))


def image_widths(browser: Any, css: str) -> list[tuple[int, int]]:
    """(the PNG's own width, the width the page shows it at) of each image in `css`, in CSS pixels."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => [i.naturalWidth, i.clientWidth]);", f"{css} img"
    )


def assert_shown_readable(width: tuple[int, int], what: str) -> None:
    """A figure's PNG is at least 900 px wide, the page shows it at least 900 px wide, and not so much smaller than
    its own size that its legend text (`figstyle.LEGEND_PT` at `figstyle.DPI`) falls under 10 px."""
    natural, shown = width
    legend_px = figstyle.LEGEND_PT * figstyle.DPI / 72 * shown / natural
    assert natural >= 900 and shown >= 900 and legend_px >= 10, (
        f"{what} is {natural} px, shown at {shown} px: legend text {legend_px:.1f} px"
    )


def progress_label(browser: Any) -> tuple[str, int]:
    """The text of the progress bar's label (tqdm's widget row) and the number of lines the page breaks it into."""
    return tuple(
        browser.execute_script(
            """
            const row = [...document.querySelectorAll('.widget-hbox')].find(b => b.querySelector('.widget-hprogress'));
            if (!row) return ['', 0];
            const label = row.querySelector('.widget-html-content');
            const range = document.createRange();
            range.selectNodeContents(label);
            const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
            return [label.textContent, tops.size];
            """
        )
    )


# --- train.ipynb: the live figure ---------------------------------------------------------------


def test_run_all_cells_of_train_shows_the_live_figure_updating_until_the_run_finishes(
    lab: Lab, browser: Any, screenshot: Callable[..., Path]
) -> None:
    name = with_parameters(lab.folder, "train.ipynb", "train-small.ipynb", TRAIN_PARAMETERS)
    open_notebook(browser, lab, name)
    screenshot("1-opened")
    run_all_cells(browser)
    seen: list[str] = []  # each distinct caption the page showed, in order

    def finished() -> bool:
        captions = texts(browser, ".amp-live-caption")
        if captions and (not seen or captions[-1] != seen[-1]):
            seen.append(captions[-1])
            if len(seen) == 2:
                screenshot("2-training", ".amp-live")
            if seen[-1].startswith("training") and " · eval loss " in seen[-1] and " · eval loss " not in seen[-2]:
                screenshot("2-training-first-eval", ".amp-live")  # the eval's dot, drawn while the run trains
        return bool(seen) and seen[-1].startswith("finished")

    wait_for(finished, 90, "the live figure to say the run finished", poll=0.05)
    wait_for(lambda: cells_done(browser), 30, "every cell to run")
    screenshot("3-finished", ".amp-live")
    assert errors(browser) == []
    training = [c for c in seen if c.startswith("training")]
    assert len(training) >= 2, f"the page showed the live figure training only as {training}"
    # the eval after step 8 is on the figure while the run trains, not only once it has ended
    assert any(" · eval loss " in c and c.endswith(" at step 8") for c in training), training
    assert seen[-1].startswith("finished: ok · updated ") and f"step 24/{TRAIN_PARAMETERS['steps']} · " in seen[-1]
    updates = int(seen[-1].split("updated ")[1].split(" ")[0])
    assert updates >= len(training) + 1
    (width,) = image_widths(browser, ".amp-live")  # one figure, updated in place
    assert_shown_readable(width, "the live figure")
    assert any(t.startswith("Status: ok") for t in texts(browser, ".jp-RenderedMarkdown"))  # the result's summary
    label, lines = progress_label(browser)
    assert label.startswith("gpt-tiny-fp16-mixed-s0") and lines == 1, (
        f"the progress label {label!r} takes {lines} lines"
    )


# --- explore.ipynb: the explorer ----------------------------------------------------------------


def small_sweep(folder: Path) -> Path:
    """Four finished runs (fp32 and fp16-mixed, seeds 0 and 1) as result files, written by the library."""
    for precision in ("fp32", "fp16-mixed"):
        for seed in (0, 1):
            scaled = precision == "fp16-mixed"
            result = make_result(
                precision,
                seed,
                rows=history(8, scaled=scaled, skip_at=3 if scaled else None, loss0=3.0 + seed / 10),
                evals=eval_curve(2.5 + seed / 10, 2.2 + seed / 10, every=4),
                metrics={"step_time_ms_median": 10.0},
            )
            result.save(folder / "results" / f"{precision}-s{seed}.json")
    return folder


def test_the_explorer_redraws_its_view_when_the_selection_changes(
    lab: Lab, browser: Any, screenshot: Callable[..., Path]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sweep = small_sweep(lab.folder / "small-sweep")
    name = with_parameters(lab.folder, "explore.ipynb", "explore-small.ipynb", {"sweep_dir": str(sweep)})
    open_notebook(browser, lab, name)
    run_all_cells(browser)
    caption = ".amp-explore-caption"
    wait_for(lambda: texts(browser, caption) and cells_done(browser), 60, "the explorer to show its first view")
    screenshot("1-train-loss", ".amp-explore")
    assert errors(browser) == []
    assert texts(browser, caption) == ["train loss · gpt-tiny · 4 runs selected"]
    first_image = image_sources(browser, ".amp-explore")
    assert first_image

    (scale,) = [b for b in browser.find_elements(By.CSS_SELECTOR, ".widget-toggle-button") if b.text == "loss scale"]
    scale.click()
    wait_for(lambda: texts(browser, caption) == ["loss scale · gpt-tiny · 4 runs selected"], 30, "the loss-scale view")
    assert image_sources(browser, ".amp-explore") != first_image
    screenshot("2-loss-scale", ".amp-explore")

    (seeds,) = [
        w
        for w in browser.find_elements(By.CSS_SELECTOR, ".widget-select-multiple")
        if "seeds" in w.text.splitlines()[0]
    ]
    # One click, one change: deselect_all() and a select would click option by option, and the view of an
    # intermediate selection (seed 1 alone, before seed 1 is deselected too) would satisfy the wait below.
    Select(seeds.find_element(By.TAG_NAME, "select")).deselect_by_visible_text("0")
    wait_for(lambda: texts(browser, caption) == ["loss scale · gpt-tiny · 2 runs selected"], 30, "the view of seed 1")
    assert "fp16-mixed" in "".join(texts(browser, ".amp-explore .amp-verdicts"))
    screenshot("3-seed-1", ".amp-explore")
    (width,) = image_widths(browser, ".amp-explore")
    assert_shown_readable(width, "the explorer's figure")
    cells = texts(browser, ".amp-explore .amp-verdicts td")
    assert cells and max(map(len, cells)) <= 40, f"a verdict cell is a wall of text: {max(cells, key=len)!r}"

    (precisions,) = [
        w
        for w in browser.find_elements(By.CSS_SELECTOR, ".widget-select-multiple")
        if "precisions" in w.text.splitlines()[0]
    ]
    note = ".amp-explore .amp-explore-note"
    Select(precisions.find_element(By.TAG_NAME, "select")).deselect_by_visible_text("fp16-mixed")
    wait_for(
        lambda: texts(browser, caption) == ["loss scale · gpt-tiny · 1 run selected"], 30, "the view of fp32 alone"
    )
    assert texts(browser, note) == [explore.NO_SCALER] and image_sources(browser, ".amp-explore") == []
    screenshot("4-no-fp16", ".amp-explore")
    Select(precisions.find_element(By.TAG_NAME, "select")).deselect_by_visible_text("fp32")
    wait_for(lambda: texts(browser, caption) == ["loss scale · gpt-tiny · 0 runs selected"], 30, "the empty selection")
    assert texts(browser, note) == [explore.NOTHING_SELECTED]  # the reason, not "no eval recorded"
    screenshot("5-nothing-selected", ".amp-explore")


# --- report.html: the sweep's report as a reader opens it ----------------------------------------------

# A small real sweep: two precisions, two seeds, a timing run; a short speed budget so the speed cell has an interval.
REPORT_SWEEP = [
    "--precisions", "fp32,bf16-mixed", "--seeds", "0,1", "--speed-budget", "8", "-p", "device=cpu",
    "-p", "steps=8", "-p", "timing_warmup_steps=2", "-p", "batch_size=4", "-p", "seq_len=32", "-p", "log_every=2",
    "-p", "eval_every=4", "-p", "wandb_mode=disabled",
]  # fmt: skip
CONTEXT_KEYS = ["Machine", "Versions", "Date", "Model", "Training", "Seeds", "Tolerance", "Runs"]
NEGATIVE_RATIO = re.compile(r"(?<![\w.])[-−]\d+(?:\.\d+)?x\b")  # "-1.14x": a ratio below zero cannot be


def wrapped(browser: Any, css: str) -> list[str]:
    """The text of each element matching `css` that the page breaks onto more than one line."""
    return browser.execute_script(
        """
        return [...document.querySelectorAll(arguments[0])].filter(cell => {
            const range = document.createRange();
            range.selectNodeContents(cell);
            const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
            return tops.size > 1;
        }).map(cell => cell.textContent);
        """,
        css,
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from amp_lib.sweep.cli import main

    out = tmp_path_factory.mktemp("report") / "sweep"
    assert main(["--out", str(out), *REPORT_SWEEP]) == 0
    return out


def test_the_report_opens_with_its_context_and_answer_and_every_verdict_cell_on_one_short_line(
    swept: Path, browser: Any, screenshot: Callable[..., Path]
) -> None:
    from amp_lib.render import context
    from amp_lib.report import build_report
    from amp_lib.results import load_sweep

    results = [json.loads(p.read_text()) for p in sorted((swept / "results").glob("*.json"))]
    browser.get((swept / "report.html").as_uri())
    wait_for(lambda: texts(browser, ".amp-context li"), 30, "the report's header")
    assert browser.execute_script("return window.innerWidth") == 1400
    screenshot("1-top")

    # The header: every fact a reader needs before the answer, each as the result files say it.
    facts = dict(fact.split(": ", 1) for fact in texts(browser, ".amp-context li"))
    assert [k for k in facts if k in CONTEXT_KEYS] == CONTEXT_KEYS
    assert facts == dict(context(build_report(load_sweep(swept))))  # the page shows what the library computes
    timing = [r for r in results if r.get("timing")]
    training = [r for r in results if not r.get("timing")]
    assert len(training) == 4 and len(timing) == 1
    assert facts["Seeds"] == "0, 1" == ", ".join(str(s) for s in sorted({r["config"]["seed"] for r in training}))
    assert {f"torch {r['plan']['torch_version']}" for r in training} == {facts["Versions"].split(",")[0]}
    params = {r["metrics"]["param_count"] for r in training}
    assert facts["Model"] == f"gpt-tiny ({params.pop() / 1e6:.2f}M parameters)" and not params
    assert "steps=8, batch_size=4, seq_len=32" in facts["Training"]
    assert facts["Tolerance"].startswith("best eval loss within ±")
    assert facts["Runs"].endswith("speed timed in 1 interleaved measurement(s)")
    answer = "".join(texts(browser, ".amp-answer"))
    assert answer.startswith("Answer:") and "bf16-mixed" in answer

    # The verdict table: one short line per cell, and no ratio below zero anywhere on the page.
    for element in browser.find_elements("css selector", ".amp-verdicts")[:1]:
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
    screenshot("2-verdicts")
    cells = texts(browser, ".amp-verdicts td")
    assert cells, "no verdict table"
    assert max(map(len, cells)) <= 60, f"a verdict cell is a wall of text: {max(cells, key=len)!r}"
    assert wrapped(browser, ".amp-verdicts td") == [], "verdict cells that wrap onto a second line at 1400 px"
    page = browser.find_element("css selector", "body").text
    assert NEGATIVE_RATIO.findall(page) == []
    rows = [texts(browser, f".amp-verdicts tbody tr:nth-child({i}) td") for i in (1, 2)]
    assert [row[0] for row in rows] == ["fp32", "bf16-mixed"] and rows[0][4:6] == ["1.00x", "baseline"]
    speed_up, speed = rows[1][4:6]
    if speed != "undecided (timed)":  # a busy machine may time a single round in the budget: no interval yet
        assert re.fullmatch(r"\d\.\d\dx \[\d\.\d\dx, \d\.\d\dx\]( †)?", speed_up), f"no interval: {speed_up!r}"
