"""Trend charts of a device's numeric values, drawn on the server as inline SVG.

No JavaScript and no chart library: the page stays usable without scripts and
within the panel's Content-Security-Policy (colours come from app.css classes,
never from style attributes). Values come from the stored ``rx`` uplinks of the
chosen range; more points than the plot is wide are averaged per time bucket,
and a silence much longer than the device's usual interval breaks the line
instead of drawing a slope across an outage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from markupsafe import Markup, escape
from sqlalchemy import select

from driver_core.storage.models import Device, UplinkRecord
from driver_core.web.devices_view import field_units

if TYPE_CHECKING:
    from driver_core.driver import Driver

RANGES = {"day": timedelta(days=1), "week": timedelta(days=7)}
RANGE_LABELS = {"day": "Last day", "week": "Last week"}
MAX_ROWS = 50_000  # a week at one uplink every 12 s; more is not a trend chart's job
WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 14, 30
MAX_POINTS = 320  # about one per 2 px of plot width


@dataclass(frozen=True, slots=True)
class Chart:
    name: str
    unit: str | None
    description: str | None
    count: int
    latest: float
    minimum: float
    maximum: float
    svg: Markup


Point = tuple[datetime, float]


def numeric_series(rows: list[tuple[datetime, dict[str, Any]]]) -> dict[str, list[Point]]:
    """Every top-level number of `data` (booleans, text, lists left out), in time order."""
    series: dict[str, list[Point]] = {}
    for at, data in rows:
        if not isinstance(data, dict):
            continue
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            series.setdefault(name, []).append((at, float(value)))
    return series


def downsample(points: list[Point], start: datetime, end: datetime, buckets: int) -> list[Point]:
    """At most `buckets` points: the mean of each equal time slice that has values."""
    if len(points) <= buckets:
        return points
    span = (end - start).total_seconds() or 1.0
    sums: dict[int, list[float]] = {}
    for at, value in points:
        index = min(buckets - 1, max(0, int((at - start).total_seconds() / span * buckets)))
        entry = sums.setdefault(index, [0.0, 0.0, 0.0])
        entry[0] += value
        entry[1] += 1
        entry[2] += (at - start).total_seconds()
    return [
        (start + timedelta(seconds=total_t / n), total / n)
        for _, (total, n, total_t) in sorted(sums.items())
    ]


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.6g}"


def _time_ticks(start: datetime, end: datetime, range_key: str) -> list[tuple[datetime, str]]:
    if range_key == "week":
        first = (start + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        step, fmt = timedelta(days=1), "%a %d"
    else:
        first = (start + timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
        first = first.replace(hour=first.hour - first.hour % 3)
        step, fmt = timedelta(hours=3), "%H:%M"
    ticks = []
    at = first
    while at <= end:
        ticks.append((at, at.strftime(fmt)))
        at += step
    return ticks


def _segments(points: list[Point]) -> list[list[Point]]:
    """Split where the gap is much longer than usual (an outage, the device was off)."""
    if len(points) < 3:
        return [points] if points else []
    gaps = sorted((b[0] - a[0]).total_seconds() for a, b in zip(points, points[1:], strict=False))
    usual = gaps[len(gaps) // 2]
    limit = max(usual * 4, 1800.0)
    segments, current = [], [points[0]]
    for previous, point in zip(points, points[1:], strict=False):
        if (point[0] - previous[0]).total_seconds() > limit:
            segments.append(current)
            current = []
        current.append(point)
    segments.append(current)
    return segments


def render_svg(
    name: str,
    unit: str | None,
    points: list[Point],
    start: datetime,
    end: datetime,
    range_key: str,
) -> Markup:
    """One chart: y grid and labels, time axis (UTC), the line, the latest point."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [v for _, v in points]
    ticks = nice_ticks(min(values), max(values))
    low, high = ticks[0], ticks[-1]
    span_t = (end - start).total_seconds()

    def x(at: datetime) -> float:
        return LEFT + (at - start).total_seconds() / span_t * plot_w

    def y(value: float) -> float:
        return TOP + plot_h - (value - low) / (high - low) * plot_h

    label = f"{name}{f' ({unit})' if unit else ''}"
    title = f"{label}, {RANGE_LABELS[range_key].lower()}: {len(points)} values"
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in ticks:
        ty = y(tick)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{ty:.1f}" y2="{ty:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">{escape(_number(tick))}</text>'
        )
    for at, text in _time_ticks(start, end, range_key):
        tx = x(at)
        parts.append(f'<line class="grid" x1="{tx:.1f}" x2="{tx:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>')
        parts.append(
            f'<text class="axis" x="{tx:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(text)}</text>'
        )
    for segment in _segments(points):
        coords = " ".join(f"{x(at):.1f},{y(v):.1f}" for at, v in segment)
        if len(segment) == 1:
            at, v = segment[0]
            parts.append(f'<circle class="dot" cx="{x(at):.1f}" cy="{y(v):.1f}" r="2.5"/>')
        else:
            parts.append(f'<polyline class="line" points="{coords}"/>')
    last_at, last_v = points[-1]
    parts.append(f'<circle class="last" cx="{x(last_at):.1f}" cy="{y(last_v):.1f}" r="3.5"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


async def device_charts(
    driver: Driver, device: Device, range_key: str, now: datetime | None = None
) -> list[Chart]:
    """The charts of `device` for `range_key` (day or week), one per numeric value."""
    end = (now or datetime.now(UTC)).astimezone(UTC)
    start = end - RANGES[range_key]
    async with driver.db.session() as session:
        rows = (
            await session.execute(
                select(UplinkRecord.received_at, UplinkRecord.data)
                .where(
                    UplinkRecord.device_id == device.id,
                    UplinkRecord.message_type == "rx",
                    UplinkRecord.received_at >= start,
                )
                .order_by(UplinkRecord.received_at.desc())
                .limit(MAX_ROWS)
            )
        ).all()
    rows.reverse()
    units = field_units(driver, device.hw_type)
    charts = []
    for name, points in numeric_series([(at, data) for at, data in rows]).items():
        values = [v for _, v in points]
        shown = downsample(points, start, end, MAX_POINTS)
        unit, description = units.get(name, (None, None))
        charts.append(
            Chart(
                name=name,
                unit=unit,
                description=description,
                count=len(points),
                latest=values[-1],
                minimum=min(values),
                maximum=max(values),
                svg=render_svg(name, unit, shown, start, end, range_key),
            )
        )
    return charts


def format_number(value: float) -> str:
    return _number(round(value, 6))
