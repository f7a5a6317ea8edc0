"""Per-API-key policies: parsing them, the gate that holds them, the keys file that
carries them (`KeyRing`), and the submission path that applies them.

The gate runs on two hand-driven clocks (monotonic seconds for the rates and the
caches, UTC time for the budgets) and reads its counts from recording fakes; the
submission tests build a real `Submitter` over the real memory store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dispatcher.auth import ApiKeyStore, KeyRing
from dispatcher.errors import ConfigError
from dispatcher.jobs import JobStatus
from dispatcher.lifecycle import JobManager, Lifecycle
from dispatcher.memory_store import MemoryJobStore
from dispatcher.metrics import KEY_REFUSALS
from dispatcher.regions import RoundRobin
from dispatcher.settings import ModelConfig, Tier
from dispatcher.submission import Submission, Submitter
from dispatcher.tenants import (
    NO_POLICY,
    POLICY_CACHE_S,
    KeyForbidden,
    KeyLimited,
    KeyPolicy,
    Priority,
    TenantGate,
    estimate_tokens,
    parse_policy,
)
from tests.conftest import MODEL, REGIONS, Clock
from tests.unit.test_submission import RecordingQueue, prompt

NOON = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)


def sha(key: str) -> str:
    """The keys file's form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


# --- parse_policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "attribute", "value"),
    [
        ("rpm=600", "rpm", 600),
        ("tpm=200000", "tpm", 200000),
        ("tokens_per_day=5000000", "tokens_per_day", 5000000),
        ("tokens_per_month=90000000", "tokens_per_month", 90000000),
        ("budget=hard", "budget_hard", True),
        ("budget=warn", "budget_hard", False),
        ("max_unfinished=20000", "max_unfinished", 20000),
        ("priority=batch", "priority", Priority.BATCH),
        ("priority=interactive", "priority", Priority.INTERACTIVE),
        ("weight=2.5", "weight", 2.5),
        ("models=gemini-a,gemini-b", "models", ("gemini-a", "gemini-b")),
        ("tiers=flex,auto,standard", "tiers", (Tier.FLEX, Tier.AUTO, Tier.STANDARD)),
        ("default_tier=auto", "default_tier", Tier.AUTO),
    ],
)
def test_policy_reads_each_setting(word: str, attribute: str, value: object) -> None:
    """Each policy word sets its own field and leaves every other one at its default."""
    policy = parse_policy([word])
    assert getattr(policy, attribute) == value
    others = {name: getattr(NO_POLICY, name) for name in KeyPolicy.__slots__ if name != attribute}
    assert {name: getattr(policy, name) for name in others} == others


def test_policy_without_words_has_no_limits() -> None:
    """No words: no rate, budget, bound, model or tier limit, interactive, weight 1."""
    policy = parse_policy([])
    assert policy == NO_POLICY
    assert policy.to_doc() == {
        "rpm": None,
        "tpm": None,
        "tokens_per_day": None,
        "tokens_per_month": None,
        "budget": "hard",
        "max_unfinished": None,
        "priority": "interactive",
        "weight": 1.0,
        "models": None,
        "tiers": None,
        "default_tier": None,
    }


@pytest.mark.parametrize(
    ("word", "setting"),
    [
        ("rpm=0", "rpm"),
        ("rpm=-1", "rpm"),
        ("rpm=1.5", "rpm"),
        ("rpm=many", "rpm"),
        ("rpm=²", "rpm"),  # str.isdigit() is true for it, int() refuses it
        ("tpm=0", "tpm"),
        ("tokens_per_day=1e6", "tokens_per_day"),
        ("tokens_per_month=-5", "tokens_per_month"),
        ("max_unfinished=0", "max_unfinished"),
        ("weight=0", "weight"),
        ("weight=1001", "weight"),
        ("weight=nan", "weight"),
        ("weight=heavy", "weight"),
        ("budget=soft", "budget"),
        ("priority=urgent", "priority"),
        ("tiers=fast", "tiers"),
        ("tiers=flex,fast", "tiers"),
        ("default_tier=fast", "default_tier"),
        ("default_tier=flex,auto", "default_tier"),
        ("colour=red", "colour"),
    ],
)
def test_bad_policy_word_is_refused_naming_the_setting(word: str, setting: str) -> None:
    """A bad value or an unknown setting raises ValueError whose message names the setting."""
    with pytest.raises(ValueError, match=rf"^{re.escape(setting)}\b"):
        parse_policy([word])


def test_unknown_setting_lists_the_settings() -> None:
    """An unknown setting's message lists every setting there is."""
    with pytest.raises(ValueError, match="not a policy setting") as caught:
        parse_policy(["colour=red"])
    for name in ("rpm", "tpm", "tokens_per_day", "max_unfinished", "budget", "default_tier"):
        assert name in str(caught.value)


@pytest.mark.parametrize("setting", ["rpm=1 rpm=2", "budget=hard budget=warn"])
def test_setting_given_twice_is_refused(setting: str) -> None:
    """A setting given twice is refused by name, even when both values are valid."""
    name = setting.partition("=")[0]
    with pytest.raises(ValueError, match=f"{name} appears twice"):
        parse_policy(setting.split())


@pytest.mark.parametrize("word", ["sk-live-0123456789abcdef", "sk-live-0123456789abcdef="])
def test_word_not_name_value_is_not_quoted(word: str) -> None:
    """A word that is not name=value (a key pasted by mistake) is refused by position only."""
    with pytest.raises(ValueError, match="policy word 2 is not name=value") as caught:
        parse_policy(["rpm=5", word])
    assert "sk-live" not in str(caught.value)


# --- ApiKeyStore.parse with policies -------------------------------------------------


def test_keys_file_lines_carry_policies() -> None:
    """A line's words become that key's policy; a line without words has no limits."""
    store = ApiKeyStore.parse(
        f"# team keys\nteam-a:{sha('key-a')} rpm=600 tiers=flex,auto default_tier=auto\n"
        f"\nteam-b:{sha('key-b')}\n"
    )
    assert store.names == ("team-a", "team-b")
    assert store.identify("key-a") == "team-a", "policy words must not change the hash"
    assert store.policy("team-a") == KeyPolicy(
        rpm=600, tiers=(Tier.FLEX, Tier.AUTO), default_tier=Tier.AUTO
    )
    assert store.policy("team-b") == NO_POLICY
    assert store.policy(None) == NO_POLICY
    assert store.policy("nobody") == NO_POLICY


def test_keys_file_without_policies_has_no_limits() -> None:
    """A plain `name:sha256hex` file (the old format) parses with no limits for anyone."""
    store = ApiKeyStore.parse(f"alice:{sha('a')}\nbob:{sha('b')}\n")
    assert [store.policy(name) for name in store.names] == [NO_POLICY, NO_POLICY]


@pytest.mark.parametrize(
    ("words", "named"),
    [("rpm=0", "rpm"), ("tiers=fast", "tiers"), ("rpm=5 colour=red", "colour")],
)
def test_bad_policy_word_names_the_line_and_key(words: str, named: str) -> None:
    """A bad policy word is a ConfigError on API_KEYS_FILE naming the line, the key and
    the setting."""
    text = f"alice:{sha('a')}\n# a comment\ncarol:{sha('c')} {words}\n"
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: line 3 \(carol\): ") as caught:
        ApiKeyStore.parse(text)
    assert named in str(caught.value)


def test_bad_policy_word_does_not_quote_a_pasted_key() -> None:
    """A key pasted onto a line after the hash is refused without appearing in the message."""
    with pytest.raises(ConfigError, match=r"line 1 \(carol\): policy word 1") as caught:
        ApiKeyStore.parse(f"carol:{sha('c')} sk-live-0123456789abcdef\n")
    assert "sk-live" not in str(caught.value)


# --- TenantGate -------------------------------------------------------------------------


class Monotonic:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Counts:
    """What the fake store answers the gate, and every read it was asked."""

    unfinished: int = 0
    used_since: dict[datetime, int] = field(default_factory=dict)
    unfinished_reads: list[str] = field(default_factory=list)
    token_reads: list[tuple[str, datetime]] = field(default_factory=list)

    async def read_unfinished(self, name: str) -> int:
        self.unfinished_reads.append(name)
        return self.unfinished

    async def read_tokens_since(self, name: str, since: datetime) -> int:
        self.token_reads.append((name, since))
        return self.used_since.get(since, 0)


@dataclass
class GateRig:
    """A gate and the clocks and counts behind it."""

    gate: TenantGate
    clock: Monotonic
    wall: Clock
    counts: Counts
    instances: list[int]

    async def admit(self, policy: KeyPolicy, *, name: str = "team-a", tokens: int = 1) -> None:
        """One request through the gate."""
        await self.gate.admit(name, policy, estimated_tokens=tokens)

    async def refusal(self, policy: KeyPolicy, *, name: str = "team-a", tokens: int = 1) -> Any:
        """One request the gate must refuse; the KeyLimited it raised."""
        with pytest.raises(KeyLimited) as caught:
            await self.admit(policy, name=name, tokens=tokens)
        return caught.value


@pytest.fixture
def gate_factory() -> Callable[..., GateRig]:
    """Builds a gate on hand-driven clocks (UTC noon by default) over recording counts."""

    def make(*, instances: int = 1, wall: datetime = NOON) -> GateRig:
        clock, wall_clock, counts, shares = Monotonic(), Clock(wall), Counts(), [instances]
        gate = TenantGate(
            instances=lambda: shares[0],
            unfinished=counts.read_unfinished,
            tokens_since=counts.read_tokens_since,
            clock=clock,
            wall_clock=wall_clock,
        )
        return GateRig(gate=gate, clock=clock, wall=wall_clock, counts=counts, instances=shares)

    return make


@pytest.fixture
def rig(gate_factory: Callable[..., GateRig]) -> GateRig:
    """A gate on one instance."""
    return gate_factory()


async def test_rpm_allows_a_minutes_worth_then_refuses(rig: GateRig) -> None:
    """rpm=N admits N requests at once, then raises KeyLimited(limit="rpm") naming the limit."""
    policy = KeyPolicy(rpm=6)
    for _ in range(6):
        await rig.admit(policy)
    refused = await rig.refusal(policy)
    assert refused.limit == "rpm"
    assert "team-a" in str(refused) and "rpm limit of 6" in str(refused)


@pytest.mark.parametrize("rpm", [2, 6, 7, 60])
async def test_rpm_retry_after_is_when_the_bucket_refills(rig: GateRig, rpm: int) -> None:
    """Retry-After is the first whole second at which the next request is admitted."""
    policy = KeyPolicy(rpm=rpm)
    for _ in range(rpm):
        await rig.admit(policy)
    retry_after = (await rig.refusal(policy)).retry_after_s
    assert retry_after == -(-60 // rpm)  # one request's refill, rounded up
    rig.clock.advance(retry_after - 1)
    if retry_after > 1:
        await rig.refusal(policy)
    rig.clock.advance(1)
    await rig.admit(policy)


async def test_rpm_refills_over_time(rig: GateRig) -> None:
    """An empty rpm=6 bucket admits one request per 10 s again, up to a minute's worth."""
    policy = KeyPolicy(rpm=6)
    for _ in range(6):
        await rig.admit(policy)
    rig.clock.advance(30)
    for _ in range(3):
        await rig.admit(policy)
    await rig.refusal(policy)
    rig.clock.advance(3600)  # a long pause refills at most a minute's worth
    for _ in range(6):
        await rig.admit(policy)
    await rig.refusal(policy)


async def test_each_instance_holds_its_share_of_rpm(gate_factory: Callable[..., GateRig]) -> None:
    """With 4 instances each holds rpm/4: rpm=8 admits 2 here, refusal naming the whole 8."""
    rig = gate_factory(instances=4)
    policy = KeyPolicy(rpm=8)
    for _ in range(2):
        await rig.admit(policy)
    refused = await rig.refusal(policy)
    assert "rpm limit of 8" in str(refused)
    assert refused.retry_after_s == 30  # 2 a minute here: one every 30 s


async def test_more_instances_shrink_a_full_bucket(gate_factory: Callable[..., GateRig]) -> None:
    """When the count of instances grows, a key's bucket here shrinks to its new share."""
    rig = gate_factory(instances=1)
    policy = KeyPolicy(rpm=8)
    await rig.admit(policy)
    rig.instances[0] = 4
    for _ in range(2):
        await rig.admit(policy)
    await rig.refusal(policy)


async def test_rates_are_per_key(rig: GateRig) -> None:
    """One key's empty bucket leaves another key's alone."""
    policy = KeyPolicy(rpm=1)
    await rig.admit(policy, name="team-a")
    await rig.refusal(policy, name="team-a")
    await rig.admit(policy, name="team-b")


async def test_tpm_counts_estimated_tokens(rig: GateRig) -> None:
    """tpm counts each request's estimated tokens, and its Retry-After is their refill."""
    policy = KeyPolicy(tpm=100)
    await rig.admit(policy, tokens=40)
    await rig.admit(policy, tokens=40)
    refused = await rig.refusal(policy, tokens=40)
    assert refused.limit == "tpm" and "tpm limit of 100" in str(refused)
    assert refused.retry_after_s == 12  # 20 tokens short at 100 a minute
    await rig.admit(policy, tokens=20)  # what is left still passes


async def test_tpm_admits_a_request_larger_than_a_minute_on_a_full_bucket(rig: GateRig) -> None:
    """A request estimated above tpm passes when the bucket is full (else it never could)."""
    policy = KeyPolicy(tpm=100)
    await rig.admit(policy, tokens=500)
    assert (await rig.refusal(policy, tokens=1)).limit == "tpm"


async def test_max_unfinished_refuses_at_the_bound(rig: GateRig) -> None:
    """With max_unfinished=3, 2 unfinished jobs admit and 3 raise KeyLimited naming both."""
    policy = KeyPolicy(max_unfinished=3)
    rig.counts.unfinished = 2
    await rig.admit(policy)
    rig.clock.advance(POLICY_CACHE_S)
    rig.counts.unfinished = 3
    refused = await rig.refusal(policy)
    assert refused.limit == "max_unfinished"
    assert "3 unfinished jobs" in str(refused) and "max_unfinished is 3" in str(refused)
    assert refused.retry_after_s == int(POLICY_CACHE_S)


async def test_max_unfinished_reads_the_store_once_per_cache_period(rig: GateRig) -> None:
    """The count of unfinished jobs is read at most once per POLICY_CACHE_S per key."""
    policy = KeyPolicy(max_unfinished=1000)
    for _ in range(10):
        await rig.admit(policy)
        rig.clock.advance(POLICY_CACHE_S / 20)
    assert rig.counts.unfinished_reads == ["team-a"]
    await rig.admit(policy, name="team-b")
    assert rig.counts.unfinished_reads == ["team-a", "team-b"], "cached per key"
    rig.clock.advance(POLICY_CACHE_S)
    await rig.admit(policy)
    assert rig.counts.unfinished_reads == ["team-a", "team-b", "team-a"]


async def test_day_budget_hard_refuses_until_utc_midnight(rig: GateRig) -> None:
    """tokens_per_day used up (budget=hard) is refused, saying it resets at next UTC midnight."""
    rig.wall.now = datetime(2026, 3, 14, 15, 30, tzinfo=UTC)
    today = datetime(2026, 3, 14, tzinfo=UTC)
    policy = KeyPolicy(tokens_per_day=1000)
    rig.counts.used_since[today] = 999
    await rig.admit(policy)
    assert rig.counts.token_reads == [("team-a", today)]
    rig.clock.advance(POLICY_CACHE_S)
    rig.counts.used_since[today] = 1000
    refused = await rig.refusal(policy)
    assert refused.limit == "tokens_per_day"
    assert "used 1000 of its tokens_per_day budget of 1000" in str(refused)
    assert "resets at 2026-03-15T00:00:00Z" in str(refused)
    assert refused.retry_after_s == 8 * 3600 + 30 * 60


async def test_day_budget_warn_accepts_and_logs(
    rig: GateRig, caplog: pytest.LogCaptureFixture
) -> None:
    """budget=warn past the budget admits the request and logs a warning naming key and limit."""
    policy = KeyPolicy(tokens_per_day=1000, budget_hard=False)
    rig.counts.used_since[datetime(2026, 3, 14, tzinfo=UTC)] = 5000
    with caplog.at_level(logging.WARNING, logger="dispatcher.tenants"):
        await rig.admit(policy)
    [record] = [r for r in caplog.records if r.name == "dispatcher.tenants"]
    assert record.levelno == logging.WARNING and "budget" in record.getMessage()
    assert (getattr(record, "caller", None), getattr(record, "limit", None)) == (
        "team-a",
        "tokens_per_day",
    )


@pytest.mark.parametrize(
    ("now", "month", "resets"),
    [
        (datetime(2026, 3, 31, 23, 0, tzinfo=UTC), "2026-03-01", "2026-04-01T00:00:00Z"),
        (datetime(2026, 12, 15, 8, 0, tzinfo=UTC), "2026-12-01", "2027-01-01T00:00:00Z"),
    ],
)
async def test_month_budget_counts_from_the_first(
    gate_factory: Callable[..., GateRig], now: datetime, month: str, resets: str
) -> None:
    """tokens_per_month counts tokens since the 1st (UTC) and resets on the next 1st."""
    rig = gate_factory(wall=now)
    start = datetime.fromisoformat(month).replace(tzinfo=UTC)
    rig.counts.used_since[start] = 10_000
    refused = await rig.refusal(KeyPolicy(tokens_per_month=10_000))
    assert refused.limit == "tokens_per_month"
    assert f"resets at {resets}" in str(refused)
    assert rig.counts.token_reads == [("team-a", start)]


async def test_month_budget_resets_on_the_first(rig: GateRig) -> None:
    """A month's spent budget is refused on the 31st and counted afresh on the 1st."""
    policy = KeyPolicy(tokens_per_month=10_000)
    rig.wall.now = datetime(2026, 3, 31, 23, 59, tzinfo=UTC)
    rig.counts.used_since[datetime(2026, 3, 1, tzinfo=UTC)] = 10_000
    await rig.refusal(policy)
    rig.wall.now = datetime(2026, 4, 1, 0, 1, tzinfo=UTC)
    rig.clock.advance(120)
    await rig.admit(policy)
    assert rig.counts.token_reads[-1] == ("team-a", datetime(2026, 4, 1, tzinfo=UTC))


async def test_day_budget_cache_does_not_outlive_the_day(rig: GateRig) -> None:
    """Just after UTC midnight a spent day budget is counted afresh, even within the cache
    period (else the key is refused with a Retry-After of a whole day)."""
    policy = KeyPolicy(tokens_per_day=1000)
    rig.wall.now = datetime(2026, 3, 14, 23, 59, 58, tzinfo=UTC)
    rig.counts.used_since[datetime(2026, 3, 14, tzinfo=UTC)] = 1000
    assert (await rig.refusal(policy)).retry_after_s == 2
    rig.wall.advance(3)
    rig.clock.advance(3)  # less than POLICY_CACHE_S
    await rig.admit(policy)


def test_check_use_refuses_a_model_not_listed(rig: GateRig) -> None:
    """A model outside `models` raises KeyForbidden naming the key, the model and the allowed."""
    policy = KeyPolicy(models=("gemini-a", "gemini-b"))
    rig.gate.check_use("team-a", policy, model="gemini-a", tier=Tier.STANDARD)
    with pytest.raises(KeyForbidden) as caught:
        rig.gate.check_use("team-a", policy, model="gemini-c", tier=Tier.STANDARD)
    message = str(caught.value)
    assert "team-a" in message and "model gemini-c" in message
    assert "allowed: gemini-a, gemini-b" in message


def test_check_use_refuses_a_tier_not_listed(rig: GateRig) -> None:
    """A tier outside `tiers` raises KeyForbidden naming the tier and the tiers allowed."""
    policy = KeyPolicy(tiers=(Tier.FLEX, Tier.AUTO))
    rig.gate.check_use("team-a", policy, model=MODEL, tier=Tier.FLEX)
    with pytest.raises(KeyForbidden, match=r"tier standard \(allowed: flex, auto\)"):
        rig.gate.check_use("team-a", policy, model=MODEL, tier=Tier.STANDARD)


def test_check_use_without_lists_allows_everything(rig: GateRig) -> None:
    """A policy without `models` or `tiers` allows any model on any tier."""
    for tier in Tier:
        rig.gate.check_use("team-a", NO_POLICY, model="anything", tier=tier)


async def test_remaining_shows_what_is_left(rig: GateRig) -> None:
    """remaining() gives the rates left (None where unlimited), refilling, without taking any."""
    assert rig.gate.remaining("team-a", NO_POLICY) == {"rpm": None, "tpm": None}
    policy = KeyPolicy(rpm=10, tpm=1000)
    for _ in range(3):
        await rig.admit(policy, tokens=100)
    assert rig.gate.remaining("team-a", policy) == {"rpm": 7.0, "tpm": 700.0}
    assert rig.gate.remaining("team-a", policy) == {"rpm": 7.0, "tpm": 700.0}
    rig.clock.advance(6)  # 1 request and 100 tokens back
    assert rig.gate.remaining("team-a", policy) == {"rpm": 8.0, "tpm": 800.0}
    assert rig.gate.remaining("team-b", policy) == {"rpm": 10.0, "tpm": 1000.0}


@pytest.mark.parametrize(
    ("request_doc", "tokens"),
    [
        ({}, 1),
        (prompt(""), 1),
        (prompt("abcd"), 1),
        (prompt("abcde"), 2),
        (prompt("x" * 400), 100),
        (
            {
                "contents": [
                    {"role": "user", "parts": [{"text": "a" * 10}, {"inlineData": {"data": "z"}}]},
                    {"role": "model", "parts": [{"text": "b" * 10}]},
                ]
            },
            5,
        ),
        ({"contents": ["not a content", {"parts": "not parts"}, {"parts": [{"text": 7}]}]}, 1),
    ],
)
def test_estimate_tokens(request_doc: dict[str, Any], tokens: int) -> None:
    """About 4 characters of text a token over every content's parts, at least 1."""
    assert estimate_tokens(request_doc) == tokens


# --- KeyRing ------------------------------------------------------------------------------


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    """A keys file holding alice (rpm=5)."""
    path = tmp_path / "api-keys"
    path.write_text(f"alice:{sha('alice-key')} rpm=5\n")
    return path


def edit(path: Path, text: str) -> None:
    """Rewrite the file and move its mtime on, as an edit a second later would."""
    mtime = path.stat().st_mtime
    path.write_text(text)
    os.utime(path, (mtime + 10, mtime + 10))


def test_keyring_picks_up_a_changed_file(keys_path: Path) -> None:
    """After RECHECK_S, a file with a new mtime is read again on `current`: new keys, new
    policies."""
    ring = KeyRing.load(str(keys_path))
    ring.RECHECK_S = 0  # look on every access, for the test
    assert list(ring.current.names) == ["alice"]
    edit(keys_path, f"alice:{sha('alice-key')} rpm=9\nbob:{sha('bob-key')}\n")
    assert list(ring.current.names) == ["alice", "bob"]
    assert ring.current.identify("bob-key") == "bob"
    assert ring.current.policy("alice").rpm == 9


def test_keyring_looks_at_most_every_recheck_period(keys_path: Path) -> None:
    """Within RECHECK_S a changed file is not looked at; reload() reads it at once."""
    ring = KeyRing.load(str(keys_path))
    ring.RECHECK_S = 3600
    edit(keys_path, f"alice:{sha('alice-key')}\nbob:{sha('bob-key')}\n")
    assert list(ring.current.names) == ["alice"]
    assert ring.reload() is True
    assert list(ring.current.names) == ["alice", "bob"]


def test_keyring_ignores_a_file_whose_mtime_did_not_change(keys_path: Path) -> None:
    """The file is re-read only when its mtime changes."""
    ring = KeyRing.load(str(keys_path))
    ring.RECHECK_S = 0
    stat = keys_path.stat()
    keys_path.write_text(f"bob:{sha('bob-key')}\n")
    os.utime(keys_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list(ring.current.names) == ["alice"]


@pytest.mark.parametrize(
    "broken", ["alice:not-a-hash\n", f"alice:{sha('alice-key')} rpm=0\n", "", None]
)
def test_keyring_keeps_the_old_keys_on_a_bad_file(keys_path: Path, broken: str | None) -> None:
    """A file that no longer parses (or is gone): reload() is False and the old keys stay,
    also through `current`; a good edit after it is picked up."""
    ring = KeyRing.load(str(keys_path))
    ring.RECHECK_S = 0
    if broken is None:
        keys_path.unlink()
    else:
        edit(keys_path, broken)
    assert ring.reload() is False
    assert ring.current.identify("alice-key") == "alice"
    assert ring.current.policy("alice").rpm == 5
    keys_path.write_text(f"bob:{sha('bob-key')}\n")
    os.utime(keys_path, (1e9, 2e9))
    assert list(ring.current.names) == ["bob"]


# --- Submitter with a gate ------------------------------------------------------------


@dataclass
class GatedRig:
    """A submitter with a gate over the memory store, and what a test inspects."""

    submitter: Submitter
    queue: RecordingQueue
    store: MemoryJobStore
    clock: Monotonic

    async def jobs(self, owner: str) -> int:
        """How many jobs the store holds for an owner."""
        counts = await self.store.count_by_status(owner, None)
        return sum(counts.values())


@pytest.fixture
def gated(clock: Clock) -> GatedRig:
    """A submitter over the memory store with a TenantGate reading that store."""
    store = MemoryJobStore(max_jobs=1000, clock=clock)
    manager = JobManager(
        store,
        Lifecycle(lease_s=30, job_ttl_s=3600, publish_grace_s=60, max_delivery_attempts=5),
        clock=clock,
    )
    # `global` too, so the flex, priority and auto tiers can run.
    models = {MODEL: ModelConfig(model_id=MODEL, regions=(*REGIONS, "global"))}

    async def unfinished(owner: str) -> int:
        counts = await store.count_by_status(owner, None)
        return counts[JobStatus.PENDING] + counts[JobStatus.RUNNING]

    async def tokens_since(owner: str, since: datetime) -> int:
        return 0

    monotonic = Monotonic()
    gate = TenantGate(
        instances=lambda: 1,
        unfinished=unfinished,
        tokens_since=tokens_since,
        clock=monotonic,
        wall_clock=clock,
    )
    queue = RecordingQueue()
    submitter = Submitter(
        manager,
        queue,
        models=models,
        default_model=MODEL,
        round_robin={MODEL: RoundRobin(models[MODEL].regions, rng=random.Random(0))},
        gate=gate,
    )
    return GatedRig(submitter=submitter, queue=queue, store=store, clock=monotonic)


def refusals(caller: str, limit: str) -> float:
    """dispatcher_key_refusals_total for one caller and limit."""
    registry = CollectorRegistry()
    registry.register(KEY_REFUSALS)
    value = registry.get_sample_value(
        "dispatcher_key_refusals_total", {"caller": caller, "limit": limit}
    )
    return value or 0.0


@pytest.mark.parametrize(("asked", "expected"), [(None, "flex"), ("standard", "standard")])
async def test_key_default_tier_applies_when_none_is_asked(
    gated: GatedRig, asked: str | None, expected: str
) -> None:
    """A job naming no tier gets its key's default_tier; one naming a tier keeps it."""
    policy = KeyPolicy(default_tier=Tier.FLEX)
    accepted = await gated.submitter.submit(
        Submission(request=prompt(), owner="team-a", tier=asked, policy=policy)
    )
    assert accepted.job.tier == expected


async def test_over_limit_submission_stores_and_admits_nothing(gated: GatedRig) -> None:
    """A submission over rpm raises KeyLimited before the queue admits it: nothing stored,
    nothing dispatched, and the refusal is counted by caller and limit."""
    policy = KeyPolicy(rpm=1)
    before = refusals("team-over", "rpm")
    await gated.submitter.submit(Submission(request=prompt(), owner="team-over", policy=policy))
    with pytest.raises(KeyLimited):
        await gated.submitter.submit(Submission(request=prompt(), owner="team-over", policy=policy))
    assert (gated.queue.admitted, len(gated.queue.dispatched), await gated.jobs("team-over")) == (
        1,
        1,
        1,
    )
    assert refusals("team-over", "rpm") == before + 1


async def test_forbidden_model_stores_and_admits_nothing(gated: GatedRig) -> None:
    """A model the key may not use raises KeyForbidden with nothing admitted or stored."""
    policy = KeyPolicy(models=("gemini-other",))
    with pytest.raises(KeyForbidden, match="allowed: gemini-other"):
        await gated.submitter.submit(Submission(request=prompt(), owner="team-a", policy=policy))
    assert (gated.queue.admitted, await gated.jobs("team-a")) == (0, 0)


async def test_key_tpm_counts_the_request_text(gated: GatedRig) -> None:
    """The submitter charges tpm the request's estimated tokens (40 characters: 10)."""
    policy = KeyPolicy(tpm=10)
    submission = Submission(request=prompt("x" * 40), owner="team-a", policy=policy)
    await gated.submitter.submit(submission)
    with pytest.raises(KeyLimited) as caught:
        await gated.submitter.submit(submission)
    assert caught.value.limit == "tpm"


async def test_key_max_unfinished_counts_the_stored_jobs(gated: GatedRig) -> None:
    """max_unfinished=1: once the cache has expired, the stored pending job refuses the next."""
    policy = KeyPolicy(max_unfinished=1)
    await gated.submitter.submit(Submission(request=prompt(), owner="team-a", policy=policy))
    gated.clock.advance(POLICY_CACHE_S)
    with pytest.raises(KeyLimited) as caught:
        await gated.submitter.submit(Submission(request=prompt(), owner="team-a", policy=policy))
    assert caught.value.limit == "max_unfinished"
    await gated.submitter.submit(Submission(request=prompt(), owner="team-b", policy=policy))


async def test_idempotent_replay_is_not_counted_against_rpm(gated: GatedRig) -> None:
    """Replaying an Idempotency-Key answers the first job and spends none of the key's rpm."""
    policy = KeyPolicy(rpm=2)
    submission = Submission(request=prompt(), owner="team-a", idempotency_key="k", policy=policy)
    first = await gated.submitter.submit(submission)
    for _ in range(3):
        again = await gated.submitter.submit(submission)
        assert again.replayed and again.job.job_id == first.job.job_id
    await gated.submitter.submit(Submission(request=prompt("new"), owner="team-a", policy=policy))
    with pytest.raises(KeyLimited):
        await gated.submitter.submit(
            Submission(request=prompt("newer"), owner="team-a", policy=policy)
        )


async def test_no_caller_means_no_gate(gated: GatedRig) -> None:
    """With API keys off (no owner) the policy is not applied."""
    policy = KeyPolicy(rpm=1, models=("gemini-other",))
    for _ in range(3):
        await gated.submitter.submit(Submission(request=prompt(), policy=policy))
