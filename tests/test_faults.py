"""The lab's faults without a VM (recovery_lab.faults): the tampering proxy's alteration is
refused by the agent's signature check, the disk changes the faults make, which faults combine,
and how each fault's expectations are judged."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from recovery_agent.protocol.envelope import BadSignature, open_envelope, seal
from recovery_agent.protocol.keys import SigningKey, key_id
from recovery_agent.protocol.wire import Directive, utcnow
from recovery_lab import tools
from recovery_lab.boot import BootReport
from recovery_lab.faults import (
    CORRUPT_GRUBENV,
    DISK_FULL,
    POWER_LOSS,
    TAMPER_DIRECTIVE,
    RunFacts,
    fill_ext4,
    judge,
    make_faults,
    sparse_copy,
    tamper_payload,
    write_fat_file,
)
from recovery_lab.timeline import Timeline

PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"


def directive() -> Directive:
    now = utcnow()
    return Directive(
        directive_id="dir-1",
        device_id="dev-1",
        agent_nonce="n" * 32,
        diagnostics_sha256="0" * 64,
        remediation_id="rem-1",
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
        actions=[{"type": "quarantine_file", "path": PATH, "sha256": "a" * 64}],
    )


def test_tampered_directive_names_another_file_and_does_not_verify() -> None:
    key = SigningKey.generate()
    envelope = seal(directive(), key)
    payload = base64.b64decode(envelope["payload"])
    altered = tamper_payload(payload)
    assert len(altered) == len(payload) and altered != payload
    assert PATH.encode() in payload and PATH[:-1].encode() + b"0" in altered
    envelope["payload"] = base64.b64encode(altered).decode()
    with pytest.raises(BadSignature):
        open_envelope(envelope, Directive, {key_id(key.public): key.public})


def test_a_payload_without_a_path_is_not_altered_silently() -> None:
    with pytest.raises(ValueError, match="names no path"):
        tamper_payload(b'{"actions":[]}')


def facts(**kw) -> RunFacts:
    base = dict(
        recovered=False,
        console_text="",
        boot=BootReport(Timeline([]), outcome="powered-off", seconds=1.0, exit_status=0, run_dir=None),
        results=[],
        directives=[],
        lab_events=[],
        event_times={},
        device_state=None,
        disk={},
    )
    base.update(kw)
    return RunFacts(**base)


def test_expectations_without_and_with_the_tampering_fault() -> None:
    assert judge([], facts(recovered=True)) == []
    assert judge([], facts(recovered=False)) == ["the machine did not recover"]
    tamper = make_faults([TAMPER_DIRECTIVE])
    refused = "[agent +  3.0s] verify   directive REJECTED: signature does not verify"
    tampered = ["lab.directive_tampered"]
    assert judge(tamper, facts(console_text=refused, lab_events=tampered)) == []
    applied = [{"outcome": "applied"}]
    assert len(judge(tamper, facts(recovered=True, results=applied, lab_events=tampered))) == 3
    assert judge(tamper, facts())  # nothing was tampered with


def test_power_loss_must_converge_with_one_directive_and_nothing_lost() -> None:
    power = make_faults([POWER_LOSS], ["journal", "moved"])
    good = facts(
        recovered=True,
        lab_events=["lab.power_cut", "lab.power_cut"],
        directives=[{"directive_id": "dir-1", "outcome": "succeeded"}],
        disk={"quarantine": {"dir-1": ["0-x", "manifest.json"]}, "journal_states": ["applied"]},
    )
    assert judge(power, good) == []
    two = facts(**{**good.__dict__, "directives": good.directives * 2})
    assert "2 directives were issued, not one" in judge(power, two)
    lost = facts(**{**good.__dict__, "disk": {**good.disk, "quarantine_lost": ["dir-1/0-x"]}})
    assert any("without their file" in p for p in judge(power, lost))
    once = facts(**{**good.__dict__, "lab_events": ["lab.power_cut"]})
    assert any("cut 1 times" in p for p in judge(power, once))


def test_disk_full_must_end_refused_and_reported() -> None:
    full = make_faults([DISK_FULL])
    refused = facts(console_text="apply     refused, nothing changed: ...", results=[{"outcome": "failed"}])
    assert judge(full, refused) == []
    assert judge(full, facts(console_text=refused.console_text)) == [
        "no refusal (result 'failed') reached the server"
    ]


def test_faults_combine_only_where_they_do_not_interfere() -> None:
    assert [f.name for f in make_faults(["cable-pull", "server-restart"])] == ["cable-pull", "server-restart"]
    with pytest.raises(ValueError, match="run it alone"):
        make_faults(["power-loss", "cable-pull"])
    with pytest.raises(ValueError, match="unknown fault 'gremlins'"):
        make_faults(["gremlins"])
    with pytest.raises(ValueError, match="once"):
        make_faults(["cable-pull", "cable-pull"])
    with pytest.raises(ValueError, match="power-loss steps"):
        make_faults([POWER_LOSS], ["journal", "nowhere"])


def test_a_filled_ext4_has_no_free_block_and_stays_sparse_and_clean(tmp_path) -> None:
    image = tmp_path / "fs.img"
    tools.run(["mkfs.ext4", "-q", "-F", "-b", "1024", str(image), "8M"])
    fill_ext4(image)
    stats = tools.run(["debugfs", "-R", "stats", str(image)])
    assert "Free blocks:              0" in stats
    tools.run(["e2fsck", "-fn", str(image)])  # raises if the filesystem has errors
    assert image.stat().st_blocks * 512 < 4 * 1024 * 1024, "unwritten extents take no room in the image"
    copy = sparse_copy(image, tmp_path / "copy.img")
    assert copy.read_bytes() == image.read_bytes()
    assert copy.stat().st_blocks <= image.stat().st_blocks


def test_a_fat_file_is_overwritten_in_the_image(tmp_path) -> None:
    image = tmp_path / "esp.img"
    tools.run(["mkfs.fat", "-C", str(image), "2048"])
    tools.run(["mmd", "-i", str(image), "::grub"], env={"MTOOLS_SKIP_CHECK": "1"})
    write_fat_file(image, "grub/grubenv", b"x" * 1024, tmp_path)
    write_fat_file(image, "grub/grubenv", b"y" * 1024, tmp_path)
    out = tmp_path / "out"
    tools.run(["mcopy", "-n", "-i", str(image), "::grub/grubenv", str(out)], env={"MTOOLS_SKIP_CHECK": "1"})
    assert out.read_bytes() == b"y" * 1024
    assert CORRUPT_GRUBENV in [f.name for f in make_faults([CORRUPT_GRUBENV])]


async def test_the_proxy_alters_directives_and_passes_everything_else() -> None:
    from aiohttp import ClientSession, web
    from aiohttp.test_utils import TestServer

    from recovery_lab.faults import DirectiveTamperer

    key = SigningKey.generate()
    envelope = seal(directive(), key)

    async def directive_poll(request: web.Request) -> web.Response:
        return web.json_response({"status": "directive", "envelope": envelope})

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"seen": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_get("/v1/reports/r-1/directive", directive_poll)
    app.router.add_post("/v1/reports", other)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    tampered: list[int] = []
    proxy = DirectiveTamperer(f"http://127.0.0.1:{upstream.port}", on_tamper=lambda: tampered.append(1))
    port = await proxy.start()
    try:
        async with ClientSession(f"http://127.0.0.1:{port}") as s:
            async with s.get("/v1/reports/r-1/directive") as r:
                answer = await r.json()
            async with s.post("/v1/reports", headers={"Authorization": "Bearer x"}, data=b"{}") as r:
                assert await r.json() == {"seen": "Bearer x"}
    finally:
        await proxy.stop()
        await upstream.close()
    assert tampered == [1]
    got = base64.b64decode(answer["envelope"]["payload"])
    assert got == tamper_payload(base64.b64decode(envelope["payload"]))
    with pytest.raises(BadSignature):
        open_envelope(answer["envelope"], Directive, {key_id(key.public): key.public})
