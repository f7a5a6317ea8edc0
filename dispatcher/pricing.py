"""The operator's price table: what answered tokens cost, for `dispatcher_cost_usd_total`.

`PRICE_TABLE_FILE` is a JSON object, read at start-up: per model, per billing rate, USD per
million tokens of each kind, e.g.
`{"gemini-2.5-flash": {"standard": {"prompt": 0.30, "candidates": 2.50}, "flex": {...}}}`.
The rate of an answer is what Vertex says it consumed (`usageMetadata.trafficType`), not
what was asked: a standard call served from Provisioned Throughput is billed at the
`provisioned` rate (usually 0 per token: PT is paid for by the month).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from dispatcher.errors import ConfigError
from dispatcher.jobs import JsonObject

# trafficType -> the rate's name in the table.
RATE_OF_TRAFFIC: Mapping[str, str] = MappingProxyType(
    {
        "ON_DEMAND": "standard",
        "PROVISIONED_THROUGHPUT": "provisioned",
        "ON_DEMAND_FLEX": "flex",
        "ON_DEMAND_PRIORITY": "priority",
    }
)
# Token kinds priced, and the usageMetadata field of each.
PRICED_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "prompt": "promptTokenCount",
        "candidates": "candidatesTokenCount",
        "cached": "cachedContentTokenCount",
        "thoughts": "thoughtsTokenCount",
    }
)


class PriceTable:
    """USD per million tokens, by model, rate and token kind."""

    def __init__(self, prices: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        self._prices = prices

    @classmethod
    def load(cls, path: str) -> PriceTable:
        """Read and check the file.

        Raises:
            ConfigError: naming PRICE_TABLE_FILE and what is wrong.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError("PRICE_TABLE_FILE", f"cannot read {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError("PRICE_TABLE_FILE", "must be a JSON object of models")
        for model, rates in doc.items():
            if not isinstance(rates, dict):
                raise ConfigError("PRICE_TABLE_FILE", f"{model}: must be an object of rates")
            for rate, kinds in rates.items():
                if rate not in RATE_OF_TRAFFIC.values():
                    raise ConfigError(
                        "PRICE_TABLE_FILE",
                        f"{model}.{rate}: not a rate ({', '.join(RATE_OF_TRAFFIC.values())})",
                    )
                if not isinstance(kinds, dict) or not all(
                    kind in PRICED_KINDS
                    and isinstance(price, int | float)
                    and not isinstance(price, bool)
                    and price >= 0
                    for kind, price in kinds.items()
                ):
                    raise ConfigError(
                        "PRICE_TABLE_FILE",
                        f"{model}.{rate}: USD per million tokens of "
                        f"{', '.join(PRICED_KINDS)}, each a number >= 0",
                    )
        return cls(doc)

    def cost_usd(self, model: str, usage: JsonObject) -> float | None:
        """What an answer's tokens cost; None when the table has no price for its rate."""
        rate = RATE_OF_TRAFFIC.get(str(usage.get("trafficType")))
        kinds = self._prices.get(model, {}).get(rate or "")
        if kinds is None:
            return None
        total = 0.0
        for kind, price in kinds.items():
            count = usage.get(PRICED_KINDS[kind])
            if isinstance(count, int) and not isinstance(count, bool):
                total += count * price / 1_000_000
        return total
