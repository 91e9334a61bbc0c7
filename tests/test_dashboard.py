"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): sign in, see incidents, devices, remediations and rollouts; approve and pause from
the page; the roles hold there as on the command line."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import pytest

from .test_api_contract import SQLITE_ONLY, populate

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("QMR_TEST_ARTIFACTS", tempfile.gettempdir())) / "qmr-dashboard"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(
            "Chromium is missing: scripts/setup.sh --test installs Debian's chromium and chromium-driver"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="qmr-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def page_wait(driver):
    """A wait that looks again when the page re-rendered under it: the dashboard redraws its
    tables every 3 s, so an element found a moment ago may be gone (stale). Every read and click
    of a table goes through ``wait.until`` with :func:`text` or :func:`press`, which find their
    element afresh inside the page. The bound is generous:
    a busy machine renders slowly, and only a broken page should run into it."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver, 90, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    )


def drive(driver, url: str, token: str, shot: str, actions):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait = page_wait(driver)
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(EC.visibility_of_element_located((By.ID, "main")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#incidents tr[data-id]"))
    result = actions(driver, wait, By)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / shot))
    return result


# The page re-renders every few seconds, replacing its elements: an element found in one
# WebDriver call may be gone by the next. These read and click inside the page in one call,
# so no element is held from one call to the next.


def text(driver, css: str) -> str:
    """The text of the first element matching ``css`` now, or "" if there is none."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css
    )


def press(wait, css: str, label: str) -> None:
    """Click the button labelled ``label`` inside the element matching ``css``, once the page
    shows it."""
    wait.until(
        lambda d: d.execute_script(
            "const box = document.querySelector(arguments[0]);"
            "const b = box && [...box.querySelectorAll('button')]"
            "  .find(b => b.textContent === arguments[1]);"
            "if (b) b.click(); return !!b;",
            css,
            label,
        ),
        f"no {label!r} button in {css}",
    )


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_approve_pause_and_resume_from_the_page(fleet, browser):
    ids = populate(fleet)
    token = fleet.service.create_user(fleet.admin, "bea", "approver").token
    revoked = ids["sim"].devices[5].device_id
    fleet.service.revoke_device(fleet.admin, revoked)

    remediation = f'#remediations tr[data-id="{ids["remediation"]}"]'
    rollout = f'.rollout[data-id="{ids["rollout"]}"]'

    def actions(driver, wait, By):
        seen = {
            "who": wait.until(lambda d: text(d, "#who")),
            "incident": wait.until(lambda d: text(d, "#incidents tr[data-id]")),
            "devices": len(driver.find_elements(By.CSS_SELECTOR, "#devices tr[data-id]")),
            "revoked": wait.until(lambda d: text(d, f'#devices tr[data-id="{revoked}"]')),
            "rollout": wait.until(lambda d: text(d, rollout)),
            "audit": text(driver, "#audit"),
        }
        press(wait, remediation, "Approve")
        wait.until(lambda d: "Approve: done" in text(d, "#status"))
        wait.until(lambda d: "approved" in text(d, remediation))
        press(wait, rollout, "Pause")
        wait.until(lambda d: "Pause: done" in text(d, "#status"))
        wait.until(lambda d: "paused" in text(d, rollout))
        seen["paused"] = fleet.service.rollout(fleet.viewer, ids["rollout"]).state
        press(wait, rollout, "Resume")
        wait.until(lambda d: "Resume: done" in text(d, "#status"))
        return seen

    seen = await asyncio.to_thread(drive, browser, fleet.url, token, "approver.png", actions)
    assert seen["who"] == "bea (approver)"
    assert "general protection fault in sensor_parse_channel" in seen["incident"]
    assert seen["devices"] == 6
    assert "revoked" in seen["revoked"], seen["revoked"]
    assert "0 served, 0 counted" in seen["rollout"], seen["rollout"]
    assert "hash chain intact" in seen["audit"]
    rem = fleet.service.remediation(fleet.viewer, ids["remediation"])
    assert rem.status == "approved" and [a.approver for a in rem.approvals] == ["bea"]
    assert seen["paused"] == "paused"
    assert fleet.service.rollout(fleet.viewer, ids["rollout"]).state == "active"
    assert [e.kind for e in fleet.service.events(fleet.viewer) if e.kind.startswith("rollout.")][-2:] == [
        "rollout.pause",
        "rollout.resume",
    ]
    approvals = [e for e in fleet.service.events(fleet.viewer) if e.kind == "remediation.approval"]
    assert approvals[-1].actor == "bea"


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_a_viewer_sees_but_cannot_approve(fleet, browser):
    ids = populate(fleet)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token

    def actions(driver, wait, By):
        press(wait, f'#remediations tr[data-id="{ids["remediation"]}"]', "Approve")
        wait.until(lambda d: "needs the approver role" in text(d, "#status"))
        return text(driver, "#status")

    status = await asyncio.to_thread(drive, browser, fleet.url, token, "viewer.png", actions)
    assert "vic is viewer" in status
    assert fleet.service.remediation(fleet.viewer, ids["remediation"]).status == "pending"


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_a_bad_token_is_refused_on_the_page(fleet, browser):
    populate(fleet)

    def go():
        from selenium.webdriver.common.by import By

        browser.get(fleet.url + "/")
        browser.find_element(By.ID, "token").send_keys("qmr_not-a-token")
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
        page_wait(browser).until(lambda d: "not recognised" in text(d, "#status"))
        return browser.find_element(By.ID, "main").is_displayed()

    assert await asyncio.to_thread(go) is False


@SQLITE_ONLY
async def test_server_values_are_shown_as_text_not_html(fleet, browser):
    """A device id is attacker-controlled input: it must never become markup."""
    from .fleetsim import FleetSim

    sim = FleetSim(fleet.service, 1)
    sim.enroll_all(fleet.enrollment_token)
    sim.crash_all()
    fleet.service.create_remediation(
        fleet.user("oscar"),
        title='<img src=x onerror="window.pwned=1">',
        actions=[{"type": "disable_driver", "name": "sensor"}],
        incident_id=None,
    )
    token = fleet.service.create_user(fleet.admin, "bea", "approver").token

    def actions(driver, wait, By):
        wait.until(lambda d: "<img" in text(d, "#remediations"))
        return driver.execute_script(
            "return window.pwned === undefined && !document.querySelector('#remediations img')"
        )

    assert await asyncio.to_thread(drive, browser, fleet.url, token, "escaping.png", actions) is True


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_an_incidents_why_shows_the_culprit_file_first(fleet, browser):
    """The correlation of the fleet's files, from the page: a silent crash's culprit first."""
    from .test_correlation import CULPRIT, silent_fleet

    incident, _ = await silent_fleet(fleet)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token

    def actions(driver, wait, By):
        press(wait, f'#incidents tr[data-id="{incident}"]', "Why")
        wait.until(lambda d: text(d, "#why-table tr[data-id='1']"))
        return text(driver, "#why-title"), text(driver, "#why-table tr[data-id='1']")

    title, first = await asyncio.to_thread(drive, browser, fleet.url, token, "why.png", actions)
    assert title == f"Why {incident}: the files of its 50 devices against 100 healthy devices"
    assert CULPRIT.path in first and CULPRIT.sha256[:12] in first
    assert "40/50 (80%)" in first and "8/100 (8%)" in first


def follow(wait, css: str) -> None:
    """Click the link matching ``css`` once the page shows it."""
    wait.until(
        lambda d: d.execute_script(
            "const a = document.querySelector(arguments[0]); if (a) a.click(); return !!a;", css
        ),
        f"no link {css}",
    )


def shown(driver, page: str) -> str | None:
    """The id of what ``page`` (incident-page, device-page) shows once rendered, or None."""
    return driver.execute_script(
        "const p = document.getElementById(arguments[0]); return p.hidden ? null : p.dataset.id || null", page
    )


def whole_page(driver) -> None:
    """The window as tall as the page, so the screenshot shows all of it."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 140, 6000))


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_an_incident_page_to_run_the_incident_from(fleet, browser):
    """From the incidents table to the incident's page: its reports over time (one bar per
    bucket with reports, as many as the server counted), the crash excerpt as text, why, the
    proposed fix, the remediation with what it changes and who approved it, and each wave's
    served, healthy and failed devices as the server counts them."""
    from .test_dashboard_api import EXCERPT, incident_over_time

    sc = incident_over_time(fleet)
    timeline = fleet.service.incident_timeline(fleet.viewer, sc.incident)
    rollout = fleet.service.rollout(fleet.viewer, sc.rollout)
    rem = fleet.service.remediation(fleet.viewer, sc.remediation)
    suggestion = fleet.service.suggest_actions(fleet.viewer, sc.incident)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token

    def actions(driver, wait, By):
        follow(wait, f'#incidents tr[data-id="{sc.incident}"] a')
        wait.until(lambda d: shown(d, "incident-page") == sc.incident)
        wait.until(lambda d: text(d, "#inc-why-table tr[data-id='1']"))
        wait.until(lambda d: "It would change" in text(d, "#suggestion"))
        seen = driver.execute_script(
            "const q = (css) => [...document.querySelectorAll(css)];"
            "return {"
            " bars: q('#chart rect.rep').map(r => [r.dataset.start, +r.dataset.reports]),"
            " marks: q('#chart line.mark').map(l => l.dataset.kind),"
            " excerpt: document.getElementById('excerpt').textContent,"
            " markup: document.querySelectorAll('#excerpt *').length,"
            " pwned: window.pwned !== undefined,"
            " waves: q('#inc-rollouts .wavebars').map(w => [w.dataset.name,"
            "   Object.fromEntries(q('#inc-rollouts .wavebars[data-wave=\"' + w.dataset.wave + '\"] .metric')"
            "     .map(m => [m.dataset.kind, [+m.dataset.n, m.querySelector('.n').textContent]]))]),"
            " devices: q('#inc-devices a').map(a => a.textContent),"
            "}"
        )
        seen["title"] = text(driver, "#inc-title")
        seen["facts"] = text(driver, "#inc-facts")
        seen["suggestion"] = text(driver, "#suggestion")
        seen["remediation"] = text(driver, f'#inc-remediations .remediation[data-id="{sc.remediation}"]')
        seen["why"] = text(driver, "#inc-why-title")
        whole_page(driver)
        return seen

    seen = await asyncio.to_thread(drive, browser, fleet.url, token, "incident.png", actions)
    assert seen["title"] == f"{sc.incident}: general protection fault in sensor_parse_channel"
    assert "kernel_panic" in seen["facts"] and "sensor_parse_channel" in seen["facts"]
    # One bar per bucket with reports, each as high as the server counted.
    expected = [(b.start, b.reports) for b in timeline.buckets if b.reports]
    assert [(datetime.fromisoformat(s), n) for s, n in seen["bars"]] == expected
    assert sum(n for _, n in seen["bars"]) == timeline.reports == 12
    assert [n for _, n in seen["bars"]] == [1, 3, 5, 2, 1]  # the spike, and after the fix the fall
    assert seen["marks"] == ["rollout", "approved"]
    # The excerpt is text: its markup is shown, never made.
    assert seen["excerpt"] == EXCERPT
    assert seen["markup"] == 0 and not seen["pwned"]
    assert seen["why"].startswith(f"Why {sc.incident}: the files of its 12 devices")
    assert suggestion.title in seen["suggestion"] and "quarantine_file" in seen["suggestion"]
    assert f"Approvals 2/2: alice ({rem.approvals[0].approved_at:%Y-%m-%d %H:%M:%S})" in seen["remediation"]
    assert "bob (" in seen["remediation"] and "approved" in seen["remediation"]
    assert "quarantine_file: path=" in seen["remediation"]
    waves = {w.name: {"served": w.served, "healthy": w.succeeded, "failed": w.failed} for w in rollout.waves}
    assert {name: {k: n for k, (n, _) in m.items()} for name, m in seen["waves"]} == waves
    assert all(int(shown_n) == n for _, m in seen["waves"] for n, shown_n in m.values())
    assert waves == {
        "canary": {"served": 1, "healthy": 1, "failed": 0},
        "all": {"served": 11, "healthy": 10, "failed": 1},
    }
    assert seen["devices"] == sorted(d.device_id for d in sc.sim.devices)


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_a_device_page_from_its_incident(fleet, browser):
    """From an incident's page to one of its devices: its state, its report (linking back to
    the incident), the directive it was served and its outcome, its agent's result, and that its
    recovery path never passed a test; then back to the overview."""
    from .test_dashboard_api import FAILING, incident_over_time

    sc = incident_over_time(fleet)
    dev = sc.device(FAILING)
    token = fleet.service.create_user(fleet.admin, "vic", "viewer").token
    assert fleet.service.device(fleet.viewer, dev.device_id).recovery_test_passed_at is None
    # Another device whose recovery path passed a test (test mode sets this): the overview says when.
    tested = sc.device(0).device_id
    with fleet.store.tx() as tx:
        tx.execute(
            "UPDATE devices SET recovery_test_passed_at = ? WHERE device_id = ?",
            "2026-11-30T12:00:00Z",
            tested,
        )

    def actions(driver, wait, By):
        follow(wait, f'#incidents tr[data-id="{sc.incident}"] a')
        wait.until(lambda d: shown(d, "incident-page") == sc.incident)
        follow(wait, f'#inc-devices a[href="#device/{dev.device_id}"]')
        wait.until(lambda d: shown(d, "device-page") == dev.device_id)
        seen = {
            "title": text(driver, "#dev-title"),
            "facts": text(driver, "#dev-facts"),
            "test": text(driver, '#dev-facts dd[data-key="recovery-test"]'),
            "report": text(driver, f'#dev-reports tr[data-id="{dev.report.report_id}"]'),
            "directive": text(driver, f'#dev-directives tr[data-id="{dev.directive_id}"]'),
            "result": text(driver, f'#dev-results tr[data-id="{dev.directive_id}"]'),
            "rows": driver.execute_script(
                "return ['dev-reports', 'dev-directives', 'dev-results']"
                ".map(id => document.querySelectorAll('#' + id + ' tr[data-id]').length)"
            ),
        }
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        whole_page(driver)
        driver.save_screenshot(str(ARTIFACTS / "device.png"))
        follow(wait, f'#dev-reports tr[data-id="{dev.report.report_id}"] a')
        wait.until(lambda d: shown(d, "incident-page") == sc.incident)
        follow(wait, "#incident-page .back a")
        wait.until(
            lambda d: text(d, "#incidents tr[data-id]") and d.find_element(By.ID, "overview").is_displayed()
        )
        seen["overview_device"] = text(driver, f'#devices tr[data-id="{dev.device_id}"]')
        seen["overview_tested"] = text(driver, f'#devices tr[data-id="{tested}"]')
        return seen

    seen = await asyncio.to_thread(drive, browser, fleet.url, token, "device-back.png", actions)
    assert seen["title"] == dev.device_id
    assert "remediation_failed" in seen["facts"]
    assert seen["test"] == "never"
    assert seen["rows"] == [1, 1, 1]
    assert (
        sc.incident in seen["report"] and "general protection fault in sensor_parse_channel" in seen["report"]
    )
    assert sc.remediation in seen["directive"] and "failed" in seen["directive"]
    assert "failed" in seen["result"] and "simulated failure" in seen["result"]
    assert "never" in seen["overview_device"]
    assert "2026-11-30 12:00:00" in seen["overview_tested"], seen["overview_tested"]


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_approve_and_pause_from_the_incident_page(fleet, browser):
    """An approver runs the incident from its page: approves the fix waiting for them, then
    pauses its rollout; the page shows both, and the server has them."""
    ids = populate(fleet)
    token = fleet.service.create_user(fleet.admin, "bea", "approver").token
    remediation = f'#inc-remediations .remediation[data-id="{ids["remediation"]}"]'
    rollout = f'#inc-rollouts .rollout[data-id="{ids["rollout"]}"]'

    def actions(driver, wait, By):
        follow(wait, f'#incidents tr[data-id="{ids["incident"]}"] a')
        wait.until(lambda d: shown(d, "incident-page") == ids["incident"])
        before = wait.until(lambda d: text(d, remediation))
        press(wait, remediation, "Approve")
        wait.until(lambda d: "Approve: done" in text(d, "#status"))
        after = wait.until(lambda d: "Approvals 1/1: bea" in text(d, remediation) and text(d, remediation))
        press(wait, rollout, "Pause")
        wait.until(lambda d: "Pause: done" in text(d, "#status"))
        wait.until(lambda d: "paused" in text(d, rollout))
        return before, after

    before, after = await asyncio.to_thread(drive, browser, fleet.url, token, "incident-approve.png", actions)
    assert "pending" in before and "Approvals 0/1: none yet" in before
    assert "approved" in after
    assert [a.approver for a in fleet.service.remediation(fleet.viewer, ids["remediation"]).approvals] == [
        "bea"
    ]
    assert fleet.service.rollout(fleet.viewer, ids["rollout"]).state == "paused"


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_an_approver_releases_a_disk_key_and_asks_for_a_recovery_test_from_the_device_page(
    fleet, browser
):
    """A device in recovery asked for its disk key (no TPM: a person must say yes). Its page
    shows the escrowed key and the waiting release; the approver releases it there and asks
    the device for a recovery test; the server has both."""
    import secrets

    from recovery_agent.protocol.keys import SigningKey

    from .test_disk_keys import escrowed, post, request_body
    from .test_server import report

    populate(fleet)
    key = SigningKey.generate()
    await fleet.enroll("enc-1", key)
    await escrowed(fleet, "enc-1", key, secrets.token_bytes(32))
    _, receipt = await report(fleet, "enc-1", key)
    pending = await post(fleet, await request_body(fleet, "enc-1", key, receipt.report_id))
    token = fleet.service.create_user(fleet.admin, "bea", "approver").token
    row = f'#dev-releases tr[data-id="{pending.release_id}"]'

    def actions(driver, wait, By):
        driver.execute_script("location.hash = '#device/enc-1'")
        wait.until(lambda d: shown(d, "device-page") == "enc-1")
        seen = {
            "keys": wait.until(lambda d: text(d, "#dev-keys")),
            "before": wait.until(lambda d: text(d, row)),
        }
        press(wait, row, "Release the key")
        wait.until(lambda d: "Release the key: done" in text(d, "#status"))
        seen["after"] = wait.until(lambda d: "approved" in text(d, row) and text(d, row))
        press(wait, "#dev-facts", "Ask for a recovery test")
        wait.until(lambda d: "Ask for a recovery test: done" in text(d, "#status"))
        seen["facts"] = wait.until(
            lambda d: "Recovery test requested" in text(d, "#dev-facts") and text(d, "#dev-facts")
        )
        return seen

    seen = await asyncio.to_thread(drive, browser, fleet.url, token, "device-keys.png", actions)
    assert "Release policy on" in seen["keys"] and "slot 7, active" in seen["keys"]
    assert "pending" in seen["before"] and "bea" in seen["after"]
    [rel] = fleet.service.disk_keys(fleet.viewer, "enc-1").releases
    assert rel.state == "approved" and rel.decided_by == "bea"
    assert fleet.service.device(fleet.viewer, "enc-1").recovery_test_requested_at is not None


@SQLITE_ONLY
@pytest.mark.timeout(300)
async def test_known_bad_rules_are_listed_and_approved_from_the_overview(fleet, browser):
    populate(fleet)
    rule = fleet.service.create_rule(
        fleet.user("oscar"),
        {
            "title": "channel 291 build 32",
            "path_pattern": "var/lib/sensor/channels/C-00000291*.sys",
            "sha256": "d" * 64,
        },
    )
    token = fleet.service.create_user(fleet.admin, "bea", "approver").token
    row = f'#rules tr[data-id="{rule.rule_id}"]'

    def actions(driver, wait, By):
        before = wait.until(lambda d: text(d, row))
        press(wait, row, "Approve")
        wait.until(lambda d: "Approve: done" in text(d, "#status"))
        return before, wait.until(lambda d: "active" in text(d, row) and text(d, row))

    before, after = await asyncio.to_thread(drive, browser, fleet.url, token, "rules.png", actions)
    assert "pending" in before and "0/1" in before and "dddddddddddd" in before
    assert "1/1" in after
    assert fleet.service.rules(fleet.viewer)[0].status == "active"
