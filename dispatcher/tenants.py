"""Many teams, one dispatcher: each API key's policy, and the gate that holds it.

A key's line in `API_KEYS_FILE` may carry its policy after the hash, as `name=value`
words (all optional):

    team-a:5e88...d8 rpm=600 tpm=200000 tokens_per_day=5000000 budget=hard
        max_unfinished=20000 priority=batch weight=2 models=gemini-2.5-flash
        tiers=flex,auto,standard default_tier=auto

- `rpm`, `tpm`: requests and (estimated) tokens per minute, a token bucket each
  (burst: one minute's worth). Tokens are estimated when a job is accepted (about 4
  characters a token, as Vertex's own estimate for text) and counted from
  `usageMetadata` for the budgets.
- `tokens_per_day` / `tokens_per_month`: a token budget (UTC day or month), `budget=hard`
  (refuse past it, the default) or `budget=warn` (log and accept).
- `max_unfinished`: jobs not yet final at once.
- `priority` (`interactive`, the default, or `batch`) and `weight` (fair share between
  keys of one class, default 1): which waiting call gets the next free region slot.
- `models`, `tiers`: what the key may use; `default_tier`: its jobs' tier when they name
  none (before the model's default).
- `webhook=https://...`: where its jobs' completion is POSTed when a job names no
  `webhook` itself; `webhook_secret=whsec_...`: the secret signing its jobs' webhooks
  (else WEBHOOK_SECRET). The worker reads the file too, for the secrets.

With several instances, each holds `1/N` of a key's rate (N: the instances that
heartbeat in the shared region state, `REGION_SYNC_S`), so the limits hold for the
service within the imbalance of the load balancer, with no store write per request.
The budgets and `max_unfinished` are read from the job store (every instance sees the
same records), cached per key for `POLICY_CACHE_S`: they may overshoot by what the
service accepts in that time.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dispatcher.errors import DispatcherError
from dispatcher.jobs import JsonObject
from dispatcher.settings import Tier, check_webhook_secret
from dispatcher.webhooks import MAX_URL_CHARS

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4
POLICY_CACHE_S = 5.0


class Priority(enum.StrEnum):
    """Which waiting work is served first."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyPolicy:
    """One key's limits; None means no limit."""

    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    budget_hard: bool = True
    max_unfinished: int | None = None
    priority: Priority = Priority.INTERACTIVE
    weight: float = 1.0
    models: tuple[str, ...] | None = None
    tiers: tuple[Tier, ...] | None = None
    default_tier: Tier | None = None
    webhook: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)  # never logged or shown

    def to_doc(self) -> JsonObject:
        """The policy as `GET /keys/me` shows it."""
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "tokens_per_day": self.tokens_per_day,
            "tokens_per_month": self.tokens_per_month,
            "budget": "hard" if self.budget_hard else "warn",
            "max_unfinished": self.max_unfinished,
            "priority": self.priority.value,
            "weight": self.weight,
            "models": list(self.models) if self.models is not None else None,
            "tiers": [t.value for t in self.tiers] if self.tiers is not None else None,
            "default_tier": self.default_tier.value if self.default_tier else None,
        }


NO_POLICY = KeyPolicy()
_COUNTS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "max_unfinished")


def parse_policy(words: list[str]) -> KeyPolicy:
    """A policy from a keys-file line's `name=value` words.

    Raises:
        ValueError: naming the word at fault and what is allowed.
    """
    values: dict[str, object] = {}
    for number, word in enumerate(words, start=1):
        name, sep, value = word.partition("=")
        if not sep or not value:
            # Not quoted: a key pasted by mistake must not reach the log.
            raise ValueError(f"policy word {number} is not name=value")
        attribute = "budget_hard" if name == "budget" else name
        if attribute in values:
            raise ValueError(f"{name} appears twice")
        values[attribute] = _policy_value(name, value)
    policy = KeyPolicy(**values)  # type: ignore[arg-type]  # each value checked by its name
    tiers = policy.tiers
    if policy.default_tier and tiers is not None and policy.default_tier not in tiers:
        raise ValueError(f"default_tier={policy.default_tier} is not one of its tiers")
    return policy


def _policy_value(name: str, value: str) -> object:
    if name in _COUNTS:
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise ValueError(f"{name}={value[:20]} is not a whole number >= 1")
        return int(value)
    if name == "weight":
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not 0 < weight <= 1000:
            raise ValueError(f"weight={value[:20]} is not a number in (0, 1000]")
        return weight
    if name == "budget":
        if value not in ("hard", "warn"):
            raise ValueError(f"budget={value[:20]} is not hard or warn")
        return value == "hard"
    if name == "priority":
        if value not in {p.value for p in Priority}:
            raise ValueError(f"priority={value[:20]} is not interactive or batch")
        return Priority(value)
    if name == "models":
        return tuple(value.split(","))
    if name in ("tiers", "default_tier"):
        tiers = value.split(",")
        unknown = [t for t in tiers if t not in {tier.value for tier in Tier}]
        if unknown or (name == "default_tier" and len(tiers) != 1):
            raise ValueError(f"{name}={value[:40]} names no tier (or more than one)")
        return Tier(tiers[0]) if name == "default_tier" else tuple(Tier(t) for t in tiers)
    if name == "webhook":
        if len(value) > MAX_URL_CHARS or not value.startswith(("https://", "http://")):
            # http: only to a host in WEBHOOK_ALLOW_HOSTS, checked where settings are known.
            raise ValueError(f"webhook={value[:40]} is not an https URL")
        return value
    if name == "webhook_secret":
        try:
            return check_webhook_secret(value)
        except ValueError as exc:
            raise ValueError(f"webhook_secret {exc}") from None  # the value is a secret
    raise ValueError(f"{name} is not a policy setting ({', '.join(_NAMES)})")


_NAMES = (
    *_COUNTS,
    "budget",
    "priority",
    "weight",
    "models",
    "tiers",
    "default_tier",
    "webhook",
    "webhook_secret",
)


class KeyLimited(DispatcherError):
    """A key is over one of its limits (answered 429 with Retry-After)."""

    def __init__(self, message: str, *, limit: str, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(message)


class KeyForbidden(DispatcherError):
    """A key may not use a model or tier (answered 403)."""


@dataclass(slots=True)
class _Bucket:
    """A token bucket refilled at `per_minute / 60` a second, holding a minute's worth."""

    per_minute: float
    level: float
    at: float

    def wait_for(self, amount: float, now: float) -> float:
        """Refill; 0 if `amount` is there (not taken), else the seconds until it would be."""
        self.level = min(self.per_minute, self.level + (now - self.at) * self.per_minute / 60)
        self.at = now
        if self.level >= amount:
            return 0.0
        return (amount - self.level) * 60 / self.per_minute


@dataclass(slots=True)
class _Seen:
    """What the store said about a key, and when."""

    at: float
    value: int


@dataclass
class TenantGate:
    """Holds each key to its policy when its jobs are accepted.

    Args:
        instances: How many instances share the keys' rates (this one included).
        unfinished: Reads how many of a key's jobs are not final (from the store).
        tokens_since: Reads how many tokens a key's answered jobs used since a time.
        clock: Monotonic seconds (the rates).
        wall_clock: UTC time (the budgets' days and months).
    """

    instances: Callable[[], int]
    unfinished: Callable[[str], Awaitable[int]]
    tokens_since: Callable[[str, datetime], Awaitable[int]]
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _rates: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    _seen: dict[tuple[str, str], _Seen] = field(default_factory=dict)

    def check_use(self, name: str, policy: KeyPolicy, *, model: str, tier: Tier) -> None:
        """Refuse a model or tier the key may not use.

        Raises:
            KeyForbidden: naming what the key may use.
        """
        if policy.models is not None and model not in policy.models:
            raise KeyForbidden(
                f"API key {name} may not use model {model} (allowed: {', '.join(policy.models)})"
            )
        if policy.tiers is not None and tier not in policy.tiers:
            raise KeyForbidden(
                f"API key {name} may not use tier {tier} "
                f"(allowed: {', '.join(t.value for t in policy.tiers)})"
            )

    async def admit(self, name: str, policy: KeyPolicy, *, estimated_tokens: int) -> None:
        """Count one request of `estimated_tokens` against the key's limits.

        Raises:
            KeyLimited: naming the limit, with when to come back.
        """
        # The store-backed limits first, then the rates: a refused request spends none
        # of its rates, and both rates are taken or neither.
        if policy.max_unfinished is not None:
            unfinished = await self._cached(name, "unfinished", lambda: self.unfinished(name))
            if unfinished >= policy.max_unfinished:
                raise KeyLimited(
                    f"API key {name} has {unfinished} unfinished jobs, its max_unfinished "
                    f"is {policy.max_unfinished}",
                    limit="max_unfinished",
                    retry_after_s=math.ceil(POLICY_CACHE_S),
                )
        await self._check_budgets(name, policy)
        share = max(1, self.instances())
        now = self.clock()
        takes: list[tuple[_Bucket, float]] = []
        for limit, per_minute, amount in (
            ("rpm", policy.rpm, 1.0),
            ("tpm", policy.tpm, float(estimated_tokens)),
        ):
            if per_minute is None:
                continue
            bucket = self._bucket(name, limit, per_minute / share, now)
            amount = min(amount, bucket.per_minute)  # a request bigger than a minute's worth
            wait_s = bucket.wait_for(amount, now)
            if wait_s > 0:
                raise KeyLimited(
                    f"API key {name} is over its {limit} limit of {per_minute} "
                    f"({'requests' if limit == 'rpm' else 'tokens'} per minute)",
                    limit=limit,
                    retry_after_s=max(1, math.ceil(wait_s)),
                )
            takes.append((bucket, amount))
        for bucket, amount in takes:
            bucket.level -= amount

    async def _check_budgets(self, name: str, policy: KeyPolicy) -> None:
        now = self.wall_clock()
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        for limit, budget, start, resets in (
            ("tokens_per_day", policy.tokens_per_day, day, _next_day(day)),
            ("tokens_per_month", policy.tokens_per_month, month, _next_month(month)),
        ):
            if budget is None:
                continue
            # Keyed by the period's start, so a new day or month counts from zero at once.
            period = f"{limit}@{start.isoformat()}"
            used = await self._cached(
                name, period, functools.partial(self.tokens_since, name, start)
            )
            if used < budget:
                continue
            if not policy.budget_hard:
                log.warning(
                    "API key over its budget (budget=warn)", extra={"caller": name, "limit": limit}
                )
                continue
            raise KeyLimited(
                f"API key {name} has used {used} of its {limit} budget of {budget} tokens; "
                f"it resets at {resets.isoformat().replace('+00:00', 'Z')}",
                limit=limit,
                retry_after_s=max(1, math.ceil((resets - now).total_seconds())),
            )

    def remaining(self, name: str, policy: KeyPolicy) -> dict[str, float | None]:
        """What is left of the key's rates on this instance now (for `GET /keys/me`)."""
        share = max(1, self.instances())
        now = self.clock()
        left: dict[str, float | None] = {}
        for limit, per_minute in (("rpm", policy.rpm), ("tpm", policy.tpm)):
            if per_minute is None:
                left[limit] = None
                continue
            bucket = self._bucket(name, limit, per_minute / share, now)
            bucket.wait_for(0, now)
            left[limit] = round(bucket.level * share, 1)
        return left

    def _bucket(self, name: str, limit: str, per_minute: float, now: float) -> _Bucket:
        bucket = self._rates.get((name, limit))
        if bucket is None:
            bucket = self._rates[name, limit] = _Bucket(per_minute, per_minute, now)
        elif bucket.per_minute != per_minute:  # the share or the file changed
            bucket.level = min(bucket.level, per_minute)
            bucket.per_minute = per_minute
        return bucket

    async def _cached(self, name: str, what: str, read: Callable[[], Awaitable[int]]) -> int:
        seen = self._seen.get((name, what))
        now = self.clock()
        if seen is None or now - seen.at >= POLICY_CACHE_S:
            seen = self._seen[name, what] = _Seen(now, await read())
        return seen.value


def estimate_tokens(request: JsonObject) -> int:
    """Tokens a request's text is likely to take (about 4 characters a token), at least 1."""
    characters = 0
    for content in request.get("contents") or ():
        for part in content.get("parts") or () if isinstance(content, dict) else ():
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str):
                characters += len(text)
    return max(1, math.ceil(characters / CHARS_PER_TOKEN))


def _next_day(day: datetime) -> datetime:
    return datetime.fromordinal(day.toordinal() + 1).replace(tzinfo=UTC)


def _next_month(month: datetime) -> datetime:
    if month.month == 12:
        return month.replace(year=month.year + 1, month=1)
    return month.replace(month=month.month + 1)
