"""The device page's charts: numeric values over the last day / week, inline SVG from the server.

The web panel fixtures of tests/test_web.py (a real driver, real HTTP, headless Chromium).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import cbor2
from playwright.async_api import expect
from sqlalchemy import insert, select

from driver_core.storage.models import Device, UplinkRecord
from driver_core.web.charts import (
    downsample,
    nice_ticks,
    numeric_series,
    render_svg,
)
from tests.test_web import (  # noqa: F401 - fixtures
    Panel,
    browser,
    browser_login,
    client,
    page,
    panel,
    screenshots,
)
from tests.web_fixtures import WebClient, shoot

NOW = datetime.now(UTC).replace(microsecond=0)


async def _store_history(panel: Panel, serial: str, hours: int, every: timedelta) -> int:  # noqa: F811
    """rx uplinks of `serial` over the last `hours`, a slow sine on pressure, battery falling."""
    import math

    async with panel.driver.db.session() as session:
        device_id = await session.scalar(select(Device.id).where(Device.serial == serial))
        rows = []
        at = NOW - timedelta(hours=hours) + every  # strictly inside the range
        index = 0
        while at <= NOW:
            if not (NOW - timedelta(hours=34) < at < NOW - timedelta(hours=26)):  # an outage
                rows.append({
                    "device_id": device_id,
                    "received_at": at,
                    "message_type": "rx",
                    "payload": cbor2.dumps({1: index}),
                    "data": {
                        "battery": 100 - index // 10,
                        "pressure": round(3 + math.sin(index / 8), 3),
                        "alarms": ["low_battery"] if index % 5 == 0 else [],
                        "valve": "open",
                        "leak": False,
                    },
                })
            at += every
            index += 1
        await session.execute(insert(UplinkRecord), rows)
        await session.commit()
    return len(rows)


# ---- the pieces -------------------------------------------------------------------------------


def test_numeric_series_keeps_numbers_only() -> None:
    t = NOW
    series = numeric_series([
        (t, {"a": 1, "b": True, "c": "x", "d": [1], "e": 2.5, "f": float("nan")}),
        (t + timedelta(minutes=1), {"a": 2}),
    ])
    assert series == {"a": [(t, 1.0), (t + timedelta(minutes=1), 2.0)], "e": [(t, 2.5)]}


def test_nice_ticks_and_downsampling() -> None:
    assert nice_ticks(2.93, 4.01) == [2.5, 3.0, 3.5, 4.0, 4.5]
    assert nice_ticks(0, 100) == [0, 25, 50, 75, 100]
    assert nice_ticks(5, 5) == [4, 6, 8, 10]  # a flat line still gets an axis
    start = NOW - timedelta(hours=1)
    points = [(start + timedelta(seconds=s), float(s)) for s in range(3600)]
    reduced = downsample(points, start, NOW, 60)
    assert len(reduced) == 60
    assert reduced[0] == (start + timedelta(seconds=29.5), 29.5)  # the mean of each minute


def test_svg_has_axes_a_line_per_segment_and_no_style_attribute() -> None:
    start = NOW - timedelta(days=1)
    points = [(start + timedelta(hours=h), float(h)) for h in range(0, 6)]
    points += [(start + timedelta(hours=h), float(h)) for h in range(12, 24)]  # 6 h silence
    svg = str(render_svg("pressure<&>", "bar", points, start, NOW, "day"))
    assert svg.startswith('<svg class="chart" viewBox="0 0 640 200"')
    assert "<title>pressure&lt;&amp;&gt; (bar), last day: 18 values</title>" in svg
    assert svg.count('<polyline class="line"') == 2  # the silence breaks the line
    assert len(re.findall(r'<text class="axis"[^>]*text-anchor="middle">\d\d:00</text>', svg)) == 8
    assert "style=" not in svg and "<script" not in svg


# ---- the page -------------------------------------------------------------------------------------


async def test_charts_tab_for_a_day_and_a_week(client: WebClient, panel: Panel) -> None:  # noqa: F811
    stored = await _store_history(panel, "A0000001", 24 * 7, timedelta(hours=1))
    day = await client.get("/devices/A0000001/charts")
    assert day.status == 200
    names = re.findall(r'<h2 id="chart-\d+">([a-z_]+)', day.text)
    assert names == ["battery", "pressure"]  # lists, text and booleans are not charted
    assert "(%)" in day.text  # the family's unit
    counts = [int(n) for n in re.findall(r"· (\d+) values</p>", day.text)]
    assert counts == [24, 24]  # hourly, the last 24 hours
    assert day.text.count('<svg class="chart"') == 2
    week = await client.get("/devices/A0000001/charts?range=week")
    counts = [int(n) for n in re.findall(r"· (\d+) values</p>", week.text)]
    assert counts == [stored, stored] and stored > 150
    assert re.search(r'<a href="/devices/A0000001/charts\?range=week" aria-current="page">', week.text)
    assert week.text.count("<polyline") == 4  # the 8 h outage splits both lines
    odd = await client.get("/devices/A0000001/charts?range=year")
    assert odd.status == 200 and 'range=day" aria-current="page"' in odd.text
    empty = await client.get("/devices/A0000002/charts")
    assert "No numeric values received in the last day." in empty.text
    missing = await client.get("/devices/Z9999999/charts")
    assert missing.status == 404


async def test_browser_shows_the_charts(page, panel: Panel) -> None:  # noqa: F811
    await _store_history(panel, "A0000001", 24 * 7, timedelta(minutes=30))
    await browser_login(page)
    await page.goto("/devices/A0000001")
    await page.get_by_role("link", name="Charts").click()
    await expect(page.get_by_role("heading", name="pressure")).to_be_visible()
    chart = page.get_by_role("img", name=re.compile(r"^pressure \(bar\), last day: \d+ values$"))
    await expect(chart).to_be_visible()
    box = await chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 90
    await shoot(page, "device-charts-day")
    await page.get_by_role("link", name="Last week").click()
    await expect(page.get_by_role("img", name=re.compile(r"^battery \(%\), last week: "))).to_be_visible()
    await shoot(page, "device-charts-week")
