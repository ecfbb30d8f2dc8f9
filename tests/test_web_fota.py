"""Web panel, firmware: library upload/delete, targets, campaign counts, the device's Firmware
section (live), over real HTTP and in headless Chromium; screenshots to artifacts/screenshots."""

# ruff: noqa: F811  (the fixtures of tests/test_web.py are imported by name)
from __future__ import annotations

import html

import aiohttp
from playwright.async_api import expect

from driver_core.device_client import FirmwareDownload
from driver_core.fota import library
from tests.conftest import session_for
from tests.test_fota import IMAGE
from tests.test_web import (  # noqa: F401  (fixtures)
    Panel,
    browser,
    browser_login,
    client,
    menu,
    page,
    panel,
    screenshots,
)
from tests.web_fixtures import WebClient, alerts, field_error, shoot


def upload_form(csrf: str, data: bytes | None = IMAGE, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("csrf_token", csrf)
    values = {"hw_type": "17", "version": "2.0.0", "release_notes": "Faster JOIN", **fields}
    for name, value in values.items():
        form.add_field(name, value)
    if data is not None:
        form.add_field("file", data, filename="vidi.bin", content_type="application/octet-stream")
    return form


async def upload(client: WebClient, data: bytes | None = IMAGE, **fields: str):
    await client.get("/firmware")
    return await client.post("/firmware/upload", upload_form(client.csrf, data, **fields))


async def test_upload_lists_the_image_with_its_sha256(client: WebClient, panel: Panel) -> None:
    result = await upload(client)
    assert result.status == 200 and result.url == panel.base + "/firmware?" + (
        "notice=uploaded&version=2.0.0&hw_type=17"
    )
    assert "Firmware 2.0.0 for hw_type 17 uploaded." in result.text
    [image] = await library.list_images(panel.driver.db)
    assert (image.hw_type, image.version, image.size, image.release_notes) == (
        17, "2.0.0", len(IMAGE), "Faster JOIN",
    )
    assert f"<code class=\"small\">{image.sha256}</code>" in result.text
    assert f"{len(IMAGE)} bytes" in result.text
    assert library.image_path(panel.driver.config_dir, image.sha256).read_bytes() == IMAGE


async def test_upload_bad_input_is_shown_next_to_the_field(client: WebClient, panel: Panel) -> None:
    result = await upload(client, None)
    assert result.status == 400
    assert field_error(result.text, "file") == "choose the image file (it must not be empty)"
    result = await upload(client, hw_type="999", version="-bad", release_notes="x" * 4001)
    assert result.status == 400
    assert field_error(result.text, "hw_type") == "choose a supported device type"
    assert field_error(result.text, "version") == (
        "must be 1 to 32 characters of A-Z a-z 0-9 . _ + - starting with a letter or digit"
    )
    assert field_error(result.text, "release_notes") == "at most 4000 characters"
    assert await library.list_images(panel.driver.db) == []
    assert (await upload(client)).status == 200
    result = await upload(client)
    assert result.status == 409
    assert field_error(result.text, "version") == (
        "hw_type 17 already has a firmware 2.0.0; delete it first"
    )


async def test_targets_set_clear_and_refused(client: WebClient, panel: Panel) -> None:
    await upload(client)
    result = await client.post("/firmware/targets", {"hw_type": "17", "version": "2.0.0"})
    assert "hw_type 17 now targets firmware 2.0.0." in result.text
    [target] = await library.list_targets(panel.driver.db)
    assert (target.hw_type, target.image.version) == (17, "2.0.0")
    result = await client.post("/firmware/targets", {"hw_type": "17", "version": ""})
    assert result.status == 400
    assert '<p class="error" id="t-17-error">choose a version</p>' in result.text
    result = await client.post("/firmware/targets", {"hw_type": "17", "action": "clear"})
    assert "hw_type 17 has no firmware target any more." in result.text
    assert await library.list_targets(panel.driver.db) == []
    result = await client.post("/firmware/targets", {"hw_type": "16", "version": "2.0.0"})
    assert result.status == 404
    assert '<p class="error" id="t-16-error">no firmware 2.0.0 for hw_type 16</p>' in result.text


async def test_delete_confirms_and_is_refused_while_downloading(
    client: WebClient, panel: Panel
) -> None:
    driver = panel.driver
    await upload(client)
    await client.post("/firmware/targets", {"hw_type": "17", "version": "2.0.0"})
    session = session_for(driver, panel.devices["A0000001"])
    await session.join("1.0.0", 17)
    await FirmwareDownload(session, "2.0.0").run(max_blocks=2)
    result = await client.get("/firmware")
    assert '<td data-label="downloading" data-state="downloading">1</td>' in result.text
    assert '<td data-label="targeted" data-state="targeted">1</td>' in result.text
    confirm = await client.get("/firmware/17/2.0.0/delete")
    assert "Delete firmware 2.0.0 for hw_type 17" in confirm.text
    refused = await client.post("/firmware/17/2.0.0/delete", {})
    assert refused.status == 409
    assert alerts(refused.text) == [
        "firmware 2.0.0 for hw_type 17 is being downloaded by 1 device(s); wait until they "
        "finish or fail"
    ]
    overview = await client.get("/devices/A0000001")
    assert 'data-fota-state="downloading"' in overview.text
    assert "its hw_type" in html.unescape(overview.text)
    await FirmwareDownload(session, "2.0.0").run()
    deleted = await client.post("/firmware/17/2.0.0/delete", {})
    assert "Firmware 2.0.0 for hw_type 17 deleted." in deleted.text
    assert await library.list_images(driver.db) == []
    assert (await client.get("/firmware/17/2.0.0/delete")).status == 404


async def test_browser_upload_target_and_watch_the_device_update(page, panel: Panel) -> None:
    driver = panel.driver
    await browser_login(page)
    await menu(page, "Firmware")
    await page.get_by_label("Device type (hw_type)").select_option("17")
    await page.get_by_label("Version").fill("2.0.0")
    await page.get_by_label("Release notes").fill("Faster JOIN")
    await page.get_by_label("Image file").set_input_files(
        {"name": "vidi.bin", "mimeType": "application/octet-stream", "buffer": IMAGE}
    )
    await page.get_by_role("button", name="Upload").click()
    await expect(page.get_by_role("status")).to_have_text("Firmware 2.0.0 for hw_type 17 uploaded.")
    await page.get_by_label("Target version for hw_type 17").select_option("2.0.0")
    await page.get_by_role("button", name="Set target of hw_type 17").click()
    await expect(page.get_by_role("status")).to_have_text("hw_type 17 now targets firmware 2.0.0.")
    await shoot(page, "firmware")
    session = session_for(driver, panel.devices["A0000001"])
    await session.join("1.0.0", 17)
    await page.goto("/devices/A0000001")
    await expect(page.locator("#firmware-status")).to_contain_text("none so far")
    await expect(page.locator("body[data-live=open]")).to_have_count(1)
    await FirmwareDownload(session, "2.0.0").run(max_blocks=3)
    await expect(page.locator("[data-fota-state]")).to_have_text("downloading")
    await shoot(page, "device-firmware")
    await page.goto("/firmware")
    await page.get_by_role("link", name="Delete 2.0.0 for hw_type 17").click()
    await page.get_by_role("button", name="Delete firmware 2.0.0").click()
    await expect(page.get_by_role("alert")).to_contain_text("is being downloaded by 1 device(s)")
    await shoot(page, "firmware-delete-refused")
