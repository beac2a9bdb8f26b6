"""The status page (/ui/) in headless Chromium during a real sweep: the job, its trials, their
eval-loss curves, the tasks in flight, the workers and the leaderboard are in the rendered
page, and a screenshot of it is saved as a test artifact.

2 trials (a grid of two learning rates) x 1 shard x 3 rounds, both at once, on one `cotune
worker` process: once a curve has two rounds the third round trains, which is the moment the
screenshot shows. The token is pasted into the page's
form as a user does (a wrong one first: the form says why it was refused).

Artifacts (folder: $COTUNE_TEST_ARTIFACTS, default build/test-artifacts): status-page.png
(docs/images/status-page.png is a copy), status-page.html (the DOM it was taken of) and
status-page-final.html (the DOM once the job succeeded).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cotune.orchestrator.api.status_page import CONTENT_SECURITY_POLICY, url_of
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.runtime.coordinator import CoordinatorService

from tests.e2e.browser import Chromium, Page, chromium_binary
from tests.e2e.sweep_stack import WorkerProcess, service_settings, wait_for_job, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("COTUNE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
OWNER = "e2e-ui-volunteer"
ROUNDS = 3
DATASET_ROWS = 400  # 40 eval rows: each round's evaluation is quick

# A curve of two rounds or more, and a task training (or the job over).
CURVES_AND_TASKS = """(() => {
  const full = [...document.querySelectorAll('#loss-chart polyline.curve')]
    .filter((line) => line.getAttribute('points').trim().split(/\\s+/).length >= 2);
  const tasks = document.querySelectorAll('#tasks tr[data-task] .state-leased').length;
  const over = /succeeded|failed|cancelled/.test(
    document.querySelector('#job .state')?.textContent || '');
  return full.length >= 1 && (tasks >= 1 || over);
})()"""


class Dom(HTMLParser):
    """The elements of a DOM dump: (tag, attributes, the id of the section it is in)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self._sections: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "section":
            self._sections.append(found.get("id"))
        self.elements.append((tag, found, self._sections[-1] if self._sections else None))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._sections:
            self._sections.pop()

    def find(self, tag: str, section: str, having: str | None = None) -> list[dict[str, str]]:
        """The attributes of every `tag` in the section (only those with attribute `having`)."""
        return [
            a
            for t, a, s in self.elements
            if t == tag and s == section and (having is None or having in a)
        ]


def curves(dom: Dom) -> dict[int, int]:
    """trial -> the points of its eval-loss polyline."""
    lines = [a for a in dom.find("polyline", "loss-chart") if "curve" in a.get("class", "")]
    return {int(a["data-trial"]): len(a["points"].split()) for a in lines}


def keep_for_diagnosis(page: Page, name: str) -> None:
    """The page as it is now, beside the artifacts (a test that failed leaves it behind)."""
    with contextlib.suppress(Exception):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.html").write_text(page.html())
        page.screenshot(ARTIFACTS / f"{name}.png")


def paste_token(page: Page, token: str) -> None:
    """Type the token into the page's form and submit it, as a user does."""
    page.evaluate(
        f"document.getElementById('token-input').value = {json.dumps(token)};"
        "document.getElementById('token-form').requestSubmit(); true"
    )


@pytest.mark.skipif(
    chromium_binary() is None,
    reason="no Chromium binary (apt-get install chromium, or set COTUNE_TEST_CHROMIUM)",
)
def test_status_page_shows_the_sweep_its_trials_curves_tasks_workers_and_leaderboard(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    synthetic_jsonl: Any,
) -> None:
    home = tmp_path / "home"
    settings = service_settings(home, redis_server, s3_server)
    spec_path = write_spec(
        tmp_path,
        synthetic_jsonl("alpaca", DATASET_ROWS),
        name="e2e-ui",
        training={"learning_rate": [5.0e-3, 1.0e-3], "max_steps": 6, "checkpoint_steps": 3},
        rounds=ROUNDS,
        search={"method": "grid", "n_trials": 2, "max_concurrent_trials": 2, "seed": 0},
    )
    spec = yaml.safe_load(spec_path.read_text())
    spec["dataset"]["shards"] = 1  # the rounds matter here, not the merge of shards
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
        Chromium.launch(tmp_path / "chromium") as browser,
    ):
        page_url = url_of(service.url)
        served = httpx.get(page_url, timeout=10)
        assert served.status_code == 200 and "app.js" in served.text
        assert served.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

        worker = WorkerProcess(service.url, client.create_join_token(OWNER).token, home, "w0")
        page = browser.new_page(1280, 900)
        try:
            job_id = client.submit(spec_path)
            page.goto(service.url + "/ui")  # redirected to /ui/
            page.wait_until("!document.getElementById('token-form').hidden", 15)

            paste_token(page, "cta_not-the-admin-token")
            refused = page.wait_until("document.getElementById('token-problem').textContent", 15)
            assert "401 unauthorized: wrong admin token" in refused

            paste_token(page, service.admin_token)
            page.wait_until(f"!!document.querySelector('#jobs tr[data-job=\"{job_id}\"]')", 20)
            stored = page.evaluate("sessionStorage.getItem('cotune.admin-token')")
            assert stored == service.admin_token
            page.reload()  # pasted once: the tab keeps it
            page.wait_until(f"!!document.querySelector('#jobs tr[data-job=\"{job_id}\"]')", 20)
            assert page.evaluate("document.getElementById('token-form').hidden") is True
            assert service.admin_token not in page.evaluate("location.href")

            # The first tasks, queued or training: a row each, with its steps as progress.
            page.wait_until("!!document.querySelector('#tasks tr[data-task] progress')", 300)
            early = Dom(page.html())

            page.wait_until(CURVES_AND_TASKS, 600, what="a full loss curve beside a live task")
            mid = page.html()
            shot = page.screenshot(ARTIFACTS / "status-page.png")
            (ARTIFACTS / "status-page.html").write_text(mid)

            job = wait_for_job(client, job_id, 600, [worker])
            assert job.state == "succeeded", job.error
            page.wait_until(
                "document.querySelector('#job .state')?.textContent === 'succeeded' && "
                "document.querySelectorAll('#loss-chart polyline.curve').length === 2",
                15,
            )
            final = page.html()
            (ARTIFACTS / "status-page-final.html").write_text(final)
            trials = client.trials(job_id)
            enrolled = client.workers()
        except BaseException:  # pytest.fail too
            keep_for_diagnosis(page, "status-page-failed")
            raise
        finally:
            worker.stop()

    # Early: each task in flight has a row with its progress bar and a live state.
    tasks = early.find("tr", "tasks", "data-task")
    assert tasks and len(early.find("progress", "tasks")) == len(tasks)
    states = {a["class"] for a in early.find("span", "tasks")}
    assert states and states <= {f"state state-{s}" for s in ("queued", "leased", "verifying")}

    # Mid-sweep: the job, its trials, a curve of two rounds, a task in flight with its
    # progress bar, the worker and the contributor.
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = Dom(mid)
    assert f"Job {job_id}" in mid
    assert [a["data-job"] for a in dom.find("tr", "jobs", "data-job")] == [job_id]
    assert sorted(int(a["data-trial"]) for a in dom.find("tr", "trials", "data-trial")) == [0, 1]
    assert max(curves(dom).values()) >= 2, curves(dom)
    if "succeeded" not in mid:
        assert dom.find("tr", "tasks", "data-task") and dom.find("progress", "tasks")
    assert [a["data-worker"] for a in dom.find("tr", "workers", "data-worker")] == [
        enrolled[0].worker_id
    ]
    assert [a["data-name"] for a in dom.find("tr", "leaderboard", "data-name")] == [OWNER]
    assert service.admin_token not in mid  # the input was cleared, nothing echoes it

    # Once over: every trial, each with a curve of every round, its losses as the API has
    # them, and nothing in flight.
    dom = Dom(final)
    assert sorted(int(a["data-trial"]) for a in dom.find("tr", "trials", "data-trial")) == [0, 1]
    assert curves(dom) == {t.number: ROUNDS for t in trials}
    for t in trials:
        row = re.search(rf'<tr data-trial="{t.number}">(.*?)</tr>', final, re.DOTALL)
        assert row and all(f"{x:.4f}" in row.group(1) for x in t.eval_losses), t
    assert not dom.find("tr", "tasks", "data-task") and "no task in flight" in final
