"""Process start-up shared by both services' entry points (`dispatcher.boot`)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatcher import boot
from dispatcher.boot import GC_THRESHOLDS, tune_gc
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings
from tests.conftest import base_env
from worker.__main__ import require_pubsub


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Put the test process's collector back as it was."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Settings]]:
    """What `boot.run` handed to `serve` (which is replaced: no server starts)."""
    calls: list[tuple[Any, Settings]] = []
    monkeypatch.setattr(boot, "serve", lambda app, settings: calls.append((app, settings)))
    return calls


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_objects_and_collects_less_often() -> None:
    """Start-up objects leave the scans; young collections come 10,000 allocations apart."""
    tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.isenabled()


def test_run_serves_the_app_built_from_the_environment(
    served: list[tuple[Any, Settings]],
) -> None:
    """Good settings: the app is built from them and served with them."""
    boot.run("ingress", lambda settings: ("app", settings.project), base_env(PORT="9000"))
    [(app, settings)] = served
    assert app == ("app", "test-project")
    assert settings.port == 9000


def _refuse_keys(settings: Settings) -> object:
    raise ConfigError("API_KEYS_FILE", "cannot read '/missing': No such file or directory")


@pytest.mark.parametrize(
    ("env", "create_app", "check", "variable"),
    [
        (base_env(MODEL_CONFIG="[oops"), lambda s: "app", None, "MODEL_CONFIG"),
        (base_env(), _refuse_keys, None, "API_KEYS_FILE"),
        (base_env(), lambda s: "app", require_pubsub, "PUBSUB_TOPIC"),
    ],
    ids=["bad-setting", "app-refuses", "service-check"],
)
def test_bad_config_exits_2_with_one_line_naming_the_variable(
    served: list[tuple[Any, Settings]],
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    create_app: Callable[[Settings], object],
    check: Callable[[Settings], None] | None,
    variable: str,
) -> None:
    """Settings, the service's own check and the app's start-up files all end the same way."""
    with pytest.raises(SystemExit) as exited:
        boot.run("worker", create_app, env, check=check)
    assert exited.value.code == boot.CONFIG_ERROR_EXIT == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"worker: configuration error: {variable}: ")
    assert not served
