"""The operator's price table (dispatcher/pricing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatcher.errors import ConfigError
from dispatcher.pricing import PriceTable

PRICES = {
    "m": {
        "standard": {"prompt": 0.30, "candidates": 2.50},
        "flex": {"prompt": 0.15, "candidates": 1.25},
        "provisioned": {},
    }
}


def _table(tmp_path: Path, doc: object) -> PriceTable:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(doc))
    return PriceTable.load(str(path))


@pytest.mark.parametrize(
    ("traffic", "expected"),
    [
        ("ON_DEMAND", (1_000_000 * 0.30 + 2_000_000 * 2.50) / 1_000_000),
        ("ON_DEMAND_FLEX", (1_000_000 * 0.15 + 2_000_000 * 1.25) / 1_000_000),
        ("PROVISIONED_THROUGHPUT", 0.0),
    ],
)
def test_cost_is_at_the_rate_vertex_billed(tmp_path: Path, traffic: str, expected: float) -> None:
    """An answer costs its tokens at the rate its trafficType names."""
    usage = {
        "promptTokenCount": 1_000_000,
        "candidatesTokenCount": 2_000_000,
        "trafficType": traffic,
    }
    assert _table(tmp_path, PRICES).cost_usd("m", usage) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("model", "usage"),
    [
        ("other", {"promptTokenCount": 5, "trafficType": "ON_DEMAND"}),
        ("m", {"promptTokenCount": 5, "trafficType": "ON_DEMAND_PRIORITY"}),
        ("m", {"promptTokenCount": 5}),
    ],
)
def test_no_price_no_cost(tmp_path: Path, model: str, usage: dict[str, object]) -> None:
    """A model or rate the table does not price (or no trafficType) has no cost, not 0."""
    assert _table(tmp_path, PRICES).cost_usd(model, usage) is None


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([], "must be a JSON object"),
        ({"m": 1}, "must be an object of rates"),
        ({"m": {"cheap": {}}}, "not a rate"),
        ({"m": {"flex": {"prompt": -1}}}, "each a number >= 0"),
        ({"m": {"flex": {"words": 1}}}, "each a number >= 0"),
    ],
)
def test_bad_table_is_refused_by_name(tmp_path: Path, doc: object, says: str) -> None:
    """A malformed price table is a ConfigError naming PRICE_TABLE_FILE and the problem."""
    with pytest.raises(ConfigError, match=says) as refused:
        _table(tmp_path, doc)
    assert refused.value.variable == "PRICE_TABLE_FILE"


def test_unreadable_table_is_refused(tmp_path: Path) -> None:
    """A missing or non-JSON file is refused naming the path."""
    with pytest.raises(ConfigError, match="cannot read"):
        PriceTable.load(str(tmp_path / "missing.json"))
