"""The explorer and share links in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, scripts/sysdeps.sh), against a devstack running real jobs.

Screenshots land in tests/artifacts/explorer/ (ignored by git) and their paths
are printed, so a failed run in CI leaves pictures of what the browser saw.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.api.auth import Gate, RateLimiter
from node.api.explorer import Explorer
from node.api.rpc.registry import Registry
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "explorer"


# ----------------------------------------------------------------- no browser


def test_peer_written_fields_are_escaped_in_the_job_page() -> None:
    evil = '<script>alert("x")</script>'
    explorer = Explorer(Registry(), None, Gate("t", RateLimiter(0)))
    job = {
        "job_id": evil, "status": "failed", "requester": evil, "executor": evil,
        "result_cid": evil, "error": {"code": "EXECUTION_FAILED", "message": evil},
        "receipt": {"note": evil}, "verification": {"why": evil}, "created_at": 1.0,
    }  # fmt: skip
    html = explorer.env.get_template("job.html").render(
        job=job, events=[{"seq": 1, "at": 1.0, "type": evil, "peer": evil, "data": {"m": evil}}],
        bids=[{"provider": evil, "kind": "nobid", "reason": evil, "message": evil}],
        share=None, revoked=None, can_download=True, mode="requester", peer_id=evil,
        authorized=True, csrf="c",
    )  # fmt: skip
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


# ------------------------------------------------------------------- a browser


def _have_browser() -> bool:
    return Path(CHROMIUM).exists() and Path(DRIVER).exists()


needs_browser = pytest.mark.skipif(
    not _have_browser(),
    reason="needs Debian's chromium and chromium-driver (scripts/sysdeps.sh installs them as root)",
)


def live(test: Any) -> Any:
    return needs_browser(pytest.mark.multiprocess(pytest.mark.slow(test)))


class Browser:
    """One Chromium with a profile of its own (cookies included), and screenshots."""

    def __init__(self, name: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix=f"meshrun-chromium-{name}-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--window-size=1280,900", f"--user-data-dir={self.profile}",
        ):  # fmt: skip
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self.name = name

    def shot(self, label: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{label}.png"
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture()
def browser() -> Iterator[Browser]:
    b = Browser("owner")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture()
def stranger() -> Iterator[Browser]:
    b = Browser("stranger")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def jobs(api_stack: Devstack) -> list[dict[str, Any]]:
    """Two real jobs run to the end on the shared devstack."""
    done = []
    with api_stack.requester.client() as client:
        model = client.storage_add(build_mlp(seed=21))
        for seed in (21, 22):
            inputs = client.storage_add(encode_tensors(make_inputs(batch=2, seed=seed)))
            job = client.call("job.submit", model_cid=model, inputs_cid=inputs)
            done.append(dict(client.wait_for_job(job["job_id"], timeout=60)))
    assert all(j["status"] == "completed" for j in done), done
    return done


def _base(api_stack: Devstack) -> str:
    return api_stack.requester.rpc_url.removesuffix("/rpc")


def _wait(driver: Any, css: str, timeout: float = 15.0) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def _wait_url(driver: Any, fragment: str, timeout: float = 15.0) -> str:
    """The URL once it holds `fragment`: a click's navigation finishes after click() returns."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(ec.url_contains(fragment))
    return str(driver.current_url)


@live
def test_login_jobs_job_download_and_share(
    api_stack: Devstack, jobs: list[dict[str, Any]], browser: Browser, stranger: Browser
) -> None:
    from selenium.webdriver.common.by import By

    base = _base(api_stack)
    d = browser.driver
    d.get(base + "/")
    assert "/login" in d.current_url  # no session: the login page, not a JSON 401
    d.find_element(By.ID, "token").send_keys("not-the-token")
    d.find_element(By.ID, "login-submit").click()
    assert "not this node's token" in _wait(d, "#login-error").text
    d.find_element(By.ID, "token").send_keys(str(api_stack.requester.token))
    d.find_element(By.ID, "login-submit").click()
    _wait(d, "table.jobs")
    cookie = d.get_cookie("meshrun_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    job = jobs[-1]
    cell = _wait(d, f'[data-status-of="{job["job_id"]}"]')
    assert cell.text == "completed"
    browser.shot("1-jobs")

    d.find_element(By.CSS_SELECTOR, f'a.job-link[href="/ui/jobs/{job["job_id"]}"]').click()
    assert _wait(d, "#job-status").text == "completed"
    timeline = d.find_element(By.ID, "timeline").text
    assert "BidAccepted" in timeline and "Completed" in timeline
    assert d.find_element(By.ID, "bids").text.count("bid") >= 1
    browser.shot("2-job")
    href = d.find_element(By.ID, "download").get_attribute("href")
    status, ctype, size = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(async r => done([r.status, r.headers.get('content-type'),"
        " (await r.arrayBuffer()).byteLength]));",
        href,
    )
    assert (status, ctype) == (200, "application/zip") and size > 100

    d.find_element(By.ID, "share-submit").click()
    url = _wait(d, "#share-url").get_attribute("value")
    assert f"/ipfs/{job['result_cid']}/?share=" in url
    browser.shot("3-shared")

    # A browser that never logged in opens the link, and follows a link inside it.
    s = stranger.driver
    s.get(url)
    assert "output.json" in s.page_source
    stranger.shot("4-share-listing")
    s.find_element(By.LINK_TEXT, "output.json").click()
    assert "share=" in _wait_url(s, "output.json") and "outputs" in s.page_source
    s.get(base + "/")
    assert "/login" in s.current_url  # the share opened the result, not the explorer

    # The peers page, then log out.
    d.get(base + "/ui/peers")
    assert api_stack.compute_nodes[0].peer_id in _wait(d, "#connected").text
    browser.shot("5-peers")
    d.get(base + "/")
    d.find_element(By.CSS_SELECTOR, "header form button").click()
    assert "/login" in _wait_url(d, "/login")


@live
def test_share_link_is_refused_after_expiry(
    api_stack: Devstack, jobs: list[dict[str, Any]], stranger: Browser
) -> None:
    # The stranger's first page load (a fresh Chromium profile) can take seconds on a
    # loaded machine; it happens before the clock starts, and the link lives long
    # enough that one more load fits inside its lifetime.
    s = stranger.driver
    s.get(_base(api_stack) + "/login")
    with api_stack.requester.client() as client:
        share = client.call("share.create", target=jobs[0]["job_id"], expires_in=8)
    s.get(share["url"])
    assert "output.json" in s.page_source
    time.sleep(max(0.0, share["expires_at"] - time.time()) + 0.5)
    s.get(share["url"])
    assert "403" in s.title or "403" in s.page_source
    assert "expired" in s.page_source
    stranger.shot("6-share-expired")


@live
def test_compute_node_shows_its_jobs_and_earnings(
    api_stack: Devstack, jobs: list[dict[str, Any]], browser: Browser
) -> None:
    from selenium.webdriver.common.by import By

    compute = api_stack.compute_nodes[0]
    with compute.client() as client:
        link = client.call("explorer.login_link")["url"]
    d = browser.driver
    d.get(link)  # the one-time link `meshrun client open` prints
    _wait(d, "table.jobs")
    assert d.find_elements(By.CSS_SELECTOR, "[data-status-of]")
    d.get(compute.rpc_url.removesuffix("/rpc") + "/ui/earnings")
    assert "total settled" in _wait(d, "#earnings").text
    browser.shot("7-earnings")
