"""The deployment scripts and images, run: lint, and what deploy.sh would run (dry run).

No test here runs gcloud: the scripts are run with --dry-run, or stop at
validation, and a `gcloud` tripwire first on PATH fails any test that calls it.
These start bash, shellcheck and hadolint, so they are integration tests; they need
no emulator and are never skipped for want of one. What can be read without running
anything (the files themselves) is checked in tests/unit/test_infra.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCRIPTS = sorted(INFRA.glob("*.sh"))
DOCKERFILES = [ROOT / "Dockerfile.ingress", ROOT / "Dockerfile.worker"]

PROJECT = "demo-project"
REGION = "europe-west4"
MODEL_CONFIG = (
    '[{"model_id":"gemini-2.5-flash","supported_regions":["us-central1","europe-west4"]}]'
)
# Commas, spaces, quotes, a backslash, "#" and "^": everything that breaks
# --set-env-vars or a sourced env file.
AWKWARD_MODEL_CONFIG = (
    '[{"model_id": "gemini-2.5-flash", "supported_regions": ["us-central1", "global"], '
    '"note": "a#b ^c, it\'s \\\\ fine"}]'
)
INGRESS_SA = f"dispatcher-ingress@{PROJECT}.iam.gserviceaccount.com"
WORKER_SA = f"dispatcher-worker@{PROJECT}.iam.gserviceaccount.com"
INVOKER_SA = f"dispatcher-push-invoker@{PROJECT}.iam.gserviceaccount.com"
PUBSUB_AGENT = "service-<project-number>@gcp-sa-pubsub.iam.gserviceaccount.com"
PUBLISHER = "roles/pubsub.publisher"
REQUIRED_SETTINGS = ("PROJECT_ID", "REGION", "MODEL_ID", "MODEL_CONFIG")

pytestmark = pytest.mark.integration


def dev_tool(name: str) -> str:
    """A binary from the dev extra: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed (looked beside {sys.executable} and on PATH); "
            "it is part of the dev extra: pip install -e '.[dev]'"
        )
    return found


def flags(command: list[str]) -> dict[str, str]:
    """The --name=value options of a command ("" for a bare --flag)."""
    found: dict[str, str] = {}
    for arg in command:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            found[name] = value
    return found


@dataclass
class Run:
    """One script run: its result and, for a dry run, the commands it printed."""

    result: subprocess.CompletedProcess[str]

    @property
    def commands(self) -> list[list[str]]:
        """The printed commands, parsed back from their shell quoting."""
        return [shlex.split(line[2:]) for line in self.result.stdout.splitlines()]

    def find(self, *prefix: str) -> list[list[str]]:
        """Every command that starts with these words."""
        return [c for c in self.commands if c[: len(prefix)] == list(prefix)]

    def one(self, *prefix: str) -> list[str]:
        """The single command that starts with these words."""
        matches = self.find(*prefix)
        assert len(matches) == 1, f"expected one {' '.join(prefix)!r}, got {matches}"
        return matches[0]

    def position(self, *prefix: str) -> int:
        """Index of the first command that starts with these words."""
        return self.commands.index(self.find(*prefix)[0])

    def env_file(self, service: str) -> dict[str, str]:
        """The environment a service would be deployed with, read from its env-vars file."""
        deploy = self.deploy(service)
        loaded: dict[str, str] = json.loads(Path(flags(deploy)["env-vars-file"]).read_text())
        return loaded

    def deploy(self, service: str) -> list[str]:
        """The `gcloud run deploy` command of dispatcher-<service>."""
        return self.one("gcloud", "run", "deploy", f"dispatcher-{service}")


@pytest.fixture
def tripwire(tmp_path: Path) -> dict[str, str]:
    """An environment whose first `gcloud` on PATH records the call and fails."""
    bin_dir = tmp_path / "tripwire"
    bin_dir.mkdir()
    log = tmp_path / "gcloud-calls.log"
    fake = bin_dir / "gcloud"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\nexit 97\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Writes a deploy config with the required settings plus overrides (None drops one)."""

    def make(*, quote: str = "", **overrides: str | None) -> Path:
        settings: dict[str, str | None] = {
            "PROJECT_ID": PROJECT,
            "REGION": REGION,
            "MODEL_ID": "gemini-2.5-flash",
            "MODEL_CONFIG": MODEL_CONFIG,
            "IMAGE_TAG": "test-tag",
            **overrides,
        }
        lines = ["# written by a test", ""]
        lines += [f"{key}={quote}{value}{quote}" for key, value in settings.items() if value]
        path = tmp_path / "config.env"
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


@pytest.fixture
def run_script(tmp_path: Path, tripwire: dict[str, str]) -> Callable[..., Run]:
    """Runs an infra script with arguments and returns what it printed."""

    def run(script: str, *args: str) -> Run:
        result = subprocess.run(
            [str(INFRA / script), *args],
            capture_output=True,
            text=True,
            env=tripwire,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        calls = tmp_path / "gcloud-calls.log"
        assert not calls.exists(), f"{script} called gcloud: {calls.read_text()}"
        return Run(result=result)

    return run


@pytest.fixture
def dry_run(
    write_config: Callable[..., Path], run_script: Callable[..., Run], tmp_path: Path
) -> Callable[..., Run]:
    """deploy.sh --dry-run with a config of the given settings; asserts it succeeded."""

    def run(*args: str, quote: str = "", **settings: str | None) -> Run:
        config = write_config(quote=quote, **settings)
        done = run_script(
            "deploy.sh", "--config", str(config), "--out-dir", str(tmp_path / "out"),
            "--dry-run", *args,
        )  # fmt: skip
        assert done.result.returncode == 0, done.result.stderr
        return done

    return run


# --- Lint -------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    """Every infra script passes shellcheck, following the files it sources."""
    result = subprocess.run(
        [dev_tool("shellcheck"), "--external-sources", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    """Both Dockerfiles pass hadolint."""
    result = subprocess.run(
        [dev_tool("hadolint"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_prints_usage_on_h(script: Path, run_script: Callable[..., Run]) -> None:
    """-h prints a usage line and exits 0."""
    done = run_script(script.name, "-h")
    assert done.result.returncode == 0, done.result.stderr
    assert done.result.stdout.startswith("Usage: ")


# --- deploy.sh --dry-run: what it would run ---------------------------------


def test_dry_run_prints_only_gcloud_commands(dry_run: Callable[..., Run]) -> None:
    """stdout holds one shell-quoted gcloud command per line, each after "+ "."""
    done = dry_run()
    lines = done.result.stdout.splitlines()
    assert len(lines) > 20
    assert all(line.startswith("+ gcloud ") for line in lines)


def test_dry_run_enables_the_apis(dry_run: Callable[..., Run]) -> None:
    """The first command enables every API the deployment uses."""
    done = dry_run()
    enable = done.one("gcloud", "services", "enable")
    assert done.position("gcloud", "services", "enable") == 0
    assert {
        f"{api}.googleapis.com"
        for api in (
            "run",
            "pubsub",
            "firestore",
            "aiplatform",
            "artifactregistry",
            "cloudbuild",
            "iam",
        )
    } <= set(enable)


def test_dry_run_builds_both_images_in_artifact_registry(dry_run: Callable[..., Run]) -> None:
    """One Cloud Build config builds both Dockerfiles into the repository it creates."""
    done = dry_run()
    repository = done.one("gcloud", "artifacts", "repositories", "create")
    assert repository[4] == "vertex-dispatcher"
    assert flags(repository)["repository-format"] == "docker"
    assert flags(repository)["location"] == REGION
    build = flags(done.one("gcloud", "builds", "submit"))
    config = Path(build["config"]).read_text()
    assert "--file=Dockerfile.ingress" in config
    assert "--file=Dockerfile.worker" in config
    images = dict(pair.split("=", 1) for pair in build["substitutions"].split(","))
    base = f"{REGION}-docker.pkg.dev/{PROJECT}/vertex-dispatcher"
    assert images == {
        "_INGRESS_IMAGE": f"{base}/ingress:test-tag",
        "_WORKER_IMAGE": f"{base}/worker:test-tag",
    }
    assert "!/Dockerfile.ingress" in Path(build["ignore-file"]).read_text()
    assert flags(done.deploy("ingress"))["image"] == images["_INGRESS_IMAGE"]
    assert flags(done.deploy("worker"))["image"] == images["_WORKER_IMAGE"]
    assert done.position("gcloud", "builds", "submit") < done.position("gcloud", "run", "deploy")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_everything_the_dockerfile_copies(
    dockerfile: Path, dry_run: Callable[..., Run]
) -> None:
    """What a Dockerfile copies is both uploaded to Cloud Build and kept by .dockerignore."""
    copied = {
        source.rstrip("/")
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    }
    ignore_file = Path(flags(dry_run().one("gcloud", "builds", "submit"))["ignore-file"])
    uploaded = {line.rstrip("/") for line in ignore_file.read_text().splitlines()}
    kept = (ROOT / ".dockerignore").read_text().splitlines()
    assert copied
    for source in copied:
        assert f"!{source}" in kept, f".dockerignore drops {source}"
        assert f"!/{source}" in uploaded, f"the upload leaves out {source}"
    assert f"!/{dockerfile.name}" in uploaded


def test_dry_run_creates_firestore_database_and_ttl(dry_run: Callable[..., Run]) -> None:
    """A Native-mode database, and TTL on expire_at of jobs, blobs and instance heartbeats."""
    done = dry_run(FIRESTORE_DATABASE="jobs-db", FIRESTORE_LOCATION="eur3")
    database = flags(done.one("gcloud", "firestore", "databases", "create"))
    assert database["database"] == "jobs-db"
    assert database["location"] == "eur3"
    assert database["type"] == "firestore-native"
    ttls = [
        c for c in done.commands if c[:5] == ["gcloud", "firestore", "fields", "ttls", "update"]
    ]
    assert {flags(ttl)["collection-group"] for ttl in ttls} == {
        "jobs",
        "blobs",
        "jobs_instances",
        "jobs_ingress_instances",
    }
    for ttl in ttls:
        assert ttl[5] == "expire_at"
        assert flags(ttl)["database"] == "jobs-db"
        assert "enable-ttl" in flags(ttl)


def test_dry_run_creates_the_results_topic_when_asked(dry_run: Callable[..., Run]) -> None:
    """With RESULTS_TOPIC, the topic is created, both services may publish to it and get
    it in their environment; without it, none of that."""
    done = dry_run(RESULTS_TOPIC="job-results")
    assert len(done.find("gcloud", "pubsub", "topics", "create", "job-results")) == 1
    bindings = [
        c
        for c in done.commands
        if c[:5] == ["gcloud", "pubsub", "topics", "add-iam-policy-binding", "job-results"]
    ]
    assert len(bindings) == 2
    assert all(flags(c)["role"] == "roles/pubsub.publisher" for c in bindings)
    without = dry_run()
    assert not [c for c in without.commands if "job-results" in c]


def test_dry_run_creates_the_webhook_push_subscription_when_asked(
    dry_run: Callable[..., Run],
) -> None:
    """With RESULTS_TOPIC and WEBHOOKS=true, a push subscription on the results topic goes
    to the worker's /webhooks, signed like the jobs' one and dead-lettering; the secret
    reaches the worker only; without WEBHOOKS, no such subscription."""
    done = dry_run(
        RESULTS_TOPIC="job-results",
        WEBHOOKS="true",
        WEBHOOK_SECRET="whsec_" + "a" * 44,
        WEBHOOK_ALLOW_HOSTS="hooks.internal:8443,10.0.0.9",
    )
    jobs = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-push"))
    hooks = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "job-results-webhooks"))
    assert hooks["topic"] == "job-results"
    assert hooks["push-endpoint"] == "<worker-url>/webhooks"
    assert hooks["push-auth-service-account"] == jobs["push-auth-service-account"] == INVOKER_SA
    assert hooks["push-auth-token-audience"] == jobs["push-auth-token-audience"]
    assert hooks["dead-letter-topic"] == "dispatcher-jobs-dead-letter"
    assert hooks["max-delivery-attempts"] == "100"
    assert len(done.find("gcloud", "pubsub", "topics", "create", "job-results")) == 1
    agent = done.one(
        "gcloud", "pubsub", "subscriptions", "add-iam-policy-binding", "job-results-webhooks"
    )
    assert flags(agent)["member"] == f"serviceAccount:{PUBSUB_AGENT}"
    worker, ingress = done.env_file("worker"), done.env_file("ingress")
    assert worker["WEBHOOK_SECRET"].startswith("whsec_")
    assert "WEBHOOK_SECRET" not in ingress
    assert worker["WEBHOOK_ALLOW_HOSTS"] == ingress["WEBHOOK_ALLOW_HOSTS"]
    without = dry_run(RESULTS_TOPIC="job-results")
    assert not without.find("gcloud", "pubsub", "subscriptions", "create", "job-results-webhooks")


def test_dry_run_creates_the_listing_indexes(dry_run: Callable[..., Run]) -> None:
    """The two composite indexes GET /jobs and GET /usage query: (owner, created_at desc,
    job_id desc) and the same with status after owner, on the jobs collection."""
    done = dry_run(FIRESTORE_DATABASE="jobs-db")
    creates = [
        c
        for c in done.commands
        if c[:5] == ["gcloud", "firestore", "indexes", "composite", "create"]
    ]
    fields = [
        [arg.split("=", 1)[1] for arg in c if arg.startswith("--field-config=")] for c in creates
    ]
    assert fields == [
        [
            "field-path=owner,order=ascending",
            "field-path=created_at,order=descending",
            "field-path=job_id,order=descending",
        ],
        [
            "field-path=owner,order=ascending",
            "field-path=status,order=ascending",
            "field-path=created_at,order=descending",
            "field-path=job_id,order=descending",
        ],
    ]
    for create in creates:
        assert flags(create)["collection-group"] == "jobs"
        assert flags(create)["database"] == "jobs-db"


def test_dry_run_creates_three_service_accounts(dry_run: Callable[..., Run]) -> None:
    """One runtime account per service and one push-invoker account."""
    done = dry_run()
    created = {c[4] for c in done.find("gcloud", "iam", "service-accounts", "create")}
    assert created == {"dispatcher-ingress", "dispatcher-worker", "dispatcher-push-invoker"}


def test_dry_run_grants_exactly_the_least_privilege_roles(dry_run: Callable[..., Run]) -> None:
    """Each binding is on the narrowest resource, and there are no others."""
    done = dry_run()
    granted = set()
    for command in done.commands:
        if "add-iam-policy-binding" in command:
            at = command.index("add-iam-policy-binding")
            scope = " ".join(command[1:at])
            option = flags(command)
            granted.add((scope, command[at + 1], option["member"], option["role"]))
    assert granted == {
        ("projects", PROJECT, f"serviceAccount:{INGRESS_SA}", "roles/datastore.user"),
        ("projects", PROJECT, f"serviceAccount:{WORKER_SA}", "roles/datastore.user"),
        ("projects", PROJECT, f"serviceAccount:{WORKER_SA}", "roles/aiplatform.user"),
        ("pubsub topics", "dispatcher-jobs", f"serviceAccount:{INGRESS_SA}", PUBLISHER),
        ("pubsub topics", "dispatcher-jobs", f"serviceAccount:{WORKER_SA}", PUBLISHER),
        ("pubsub topics", "dispatcher-jobs-interactive", f"serviceAccount:{INGRESS_SA}", PUBLISHER),
        ("pubsub topics", "dispatcher-jobs-interactive", f"serviceAccount:{WORKER_SA}", PUBLISHER),
        ("run services", "dispatcher-worker", f"serviceAccount:{INVOKER_SA}", "roles/run.invoker"),
        (
            "iam service-accounts", INVOKER_SA, f"serviceAccount:{PUBSUB_AGENT}",
            "roles/iam.serviceAccountTokenCreator",
        ),
        (
            "pubsub topics", "dispatcher-jobs-dead-letter", f"serviceAccount:{PUBSUB_AGENT}",
            PUBLISHER,
        ),
        (
            "pubsub subscriptions", "dispatcher-jobs-push", f"serviceAccount:{PUBSUB_AGENT}",
            "roles/pubsub.subscriber",
        ),
        (
            "pubsub subscriptions", "dispatcher-jobs-interactive-push",
            f"serviceAccount:{PUBSUB_AGENT}", "roles/pubsub.subscriber",
        ),
    }  # fmt: skip


def test_dry_run_creates_topics_and_dead_letter_subscription(dry_run: Callable[..., Run]) -> None:
    """The jobs topics (batch, interactive), the dead-letter topic, and a pull subscription
    on the latter (a dry run cannot see that the second pubsub.sh finds the dead-letter
    topic created by the first, so it may list it twice)."""
    done = dry_run()
    topics = {c[4] for c in done.find("gcloud", "pubsub", "topics", "create")}
    assert sorted(topics) == [
        "dispatcher-jobs",
        "dispatcher-jobs-dead-letter",
        "dispatcher-jobs-interactive",
    ]
    dead = done.find(
        "gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-dead-letter-sub"
    )
    assert dead and all(command == dead[0] for command in dead)
    assert flags(dead[0])["topic"] == "dispatcher-jobs-dead-letter"
    assert "push-endpoint" not in flags(dead[0])


def test_dry_run_push_subscription_has_auth_retry_and_dead_letter(
    dry_run: Callable[..., Run],
) -> None:
    """The push subscription signs as the invoker and dead-letters after N attempts."""
    done = dry_run(ACK_DEADLINE_S="300", MAX_DELIVERY_ATTEMPTS="7", MIN_RETRY_DELAY="5s")
    push = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-push"))
    assert push["topic"] == "dispatcher-jobs"
    assert push["push-endpoint"] == "<worker-url>/"
    assert push["push-auth-service-account"] == INVOKER_SA
    assert push["push-auth-token-audience"].startswith("https://dispatcher-worker-")
    assert push["ack-deadline"] == "300"
    assert push["dead-letter-topic"] == "dispatcher-jobs-dead-letter"
    assert push["max-delivery-attempts"] == "7"
    assert (push["min-retry-delay"], push["max-retry-delay"]) == ("5s", "600s")


def test_interactive_subscription_has_the_jobs_subscriptions_policy(
    dry_run: Callable[..., Run],
) -> None:
    """The interactive jobs' push subscription differs from the batch one only in its topic
    and name, and both services are told the interactive topic."""
    done = dry_run(ACK_DEADLINE_S="300", MAX_DELIVERY_ATTEMPTS="7")
    push = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-push"))
    fast = flags(
        done.one("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-interactive-push")
    )
    assert fast.pop("topic") == "dispatcher-jobs-interactive"
    assert push.pop("topic") == "dispatcher-jobs"
    assert fast == push
    for service in ("worker", "ingress"):
        assert done.env_file(service)["INTERACTIVE_TOPIC"] == "dispatcher-jobs-interactive"


def test_worker_settings_match_the_push_subscription(dry_run: Callable[..., Run]) -> None:
    """The worker expects the audience, account, deadline and attempts the subscription uses."""
    done = dry_run(ACK_DEADLINE_S="300", MAX_DELIVERY_ATTEMPTS="9")
    push = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-push"))
    env = done.env_file("worker")
    assert env["PUSH_AUDIENCE"] == push["push-auth-token-audience"]
    assert env["PUSH_SERVICE_ACCOUNT"] == push["push-auth-service-account"]
    assert env["PUSH_ACK_DEADLINE_S"] == push["ack-deadline"] == "300"
    assert env["MAX_DELIVERY_ATTEMPTS"] == push["max-delivery-attempts"] == "9"
    assert flags(done.deploy("worker"))["set-custom-audiences"] == env["PUSH_AUDIENCE"]


def test_worker_is_deployed_before_its_push_subscription(dry_run: Callable[..., Run]) -> None:
    """Resources come before what depends on them; the ingress comes last."""
    done = dry_run()
    worker = done.position("gcloud", "run", "deploy", "dispatcher-worker")
    push = done.position("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-push")
    assert done.position("gcloud", "iam", "service-accounts", "create") < worker < push
    assert done.position("gcloud", "pubsub", "topics", "create") < done.position(
        "gcloud", "pubsub", "topics", "add-iam-policy-binding"
    )
    assert done.position("gcloud", "firestore", "databases", "create") < done.position(
        "gcloud", "firestore", "fields", "ttls", "update"
    )
    assert done.commands[-1][:4] == ["gcloud", "run", "deploy", "dispatcher-ingress"]


@pytest.mark.parametrize(
    ("settings", "timeout"),
    [({}, 600), ({"ACK_DEADLINE_S": "120"}, 120), ({"WORKER_TIMEOUT_S": "900"}, 900)],
    ids=["defaults", "short-deadline", "longer-timeout"],
)
def test_worker_is_private_with_timeout_covering_ack_deadline(
    dry_run: Callable[..., Run], settings: dict[str, str], timeout: int
) -> None:
    """The worker requires IAM, and its timeout is at least the ack deadline."""
    done = dry_run(**settings)
    worker = flags(done.deploy("worker"))
    push = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "dispatcher-jobs-push"))
    assert "no-allow-unauthenticated" in worker
    assert "allow-unauthenticated" not in worker
    assert int(worker["timeout"]) == timeout >= int(push["ack-deadline"])


@pytest.mark.parametrize(
    ("args", "settings", "public"),
    [
        ((), {}, False),
        (("--public",), {}, True),
        ((), {"INGRESS_PUBLIC": "true"}, True),
        ((), {"INGRESS_PUBLIC": "false"}, False),
    ],
    ids=["default", "flag", "setting", "setting-false"],
)
def test_ingress_is_private_unless_made_public(
    dry_run: Callable[..., Run], args: tuple[str, ...], settings: dict[str, str], public: bool
) -> None:
    """The ingress needs IAM by default; --public or INGRESS_PUBLIC=true opens it."""
    done = dry_run(*args, **settings)
    ingress = flags(done.deploy("ingress"))
    assert ("allow-unauthenticated" in ingress) is public
    assert ("no-allow-unauthenticated" in ingress) is not public
    assert "allow-unauthenticated" not in flags(done.deploy("worker"))


@pytest.mark.parametrize("quote", ["", "'", '"'], ids=["bare", "single-quoted", "double-quoted"])
@pytest.mark.parametrize("service", ["ingress", "worker"])
def test_model_config_reaches_the_service_intact(
    dry_run: Callable[..., Run], quote: str, service: str
) -> None:
    """MODEL_CONFIG arrives byte for byte, commas, quotes, # and ^ included."""
    done = dry_run(MODEL_CONFIG=AWKWARD_MODEL_CONFIG, quote=quote)
    env = done.env_file(service)
    assert env["MODEL_CONFIG"] == AWKWARD_MODEL_CONFIG
    assert json.loads(env["MODEL_CONFIG"]) == json.loads(AWKWARD_MODEL_CONFIG)
    assert "set-env-vars" not in flags(done.deploy(service))


def test_services_share_their_application_settings(dry_run: Callable[..., Run]) -> None:
    """Both services get the same project, model, Firestore and topic settings."""
    done = dry_run(JOB_TTL_S="86400")
    ingress, worker = done.env_file("ingress"), done.env_file("worker")
    shared = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "MODEL_ID": "gemini-2.5-flash",
        "FIRESTORE_DATABASE": "vertex-dispatcher",
        "FIRESTORE_COLLECTION": "jobs",
        "PUBSUB_TOPIC": "dispatcher-jobs",
        "JOB_TTL_S": "86400",
    }
    assert shared.items() <= ingress.items()
    assert shared.items() <= worker.items()
    assert "PUSH_AUDIENCE" not in ingress
    assert "PORT" not in ingress  # reserved: Cloud Run sets it
    assert "PORT" not in worker


def test_config_file_is_read_not_evaluated(dry_run: Callable[..., Run], tmp_path: Path) -> None:
    """Shell syntax in a value stays text: nothing in the config file is run."""
    marker = tmp_path / "evaluated"
    value = MODEL_CONFIG.replace("}]", f', "x": "$(touch {marker})`touch {marker}`"}}]')
    done = dry_run(MODEL_CONFIG=value)
    assert not marker.exists()
    assert done.env_file("worker")["MODEL_CONFIG"] == value


# --- deploy.sh refusals -----------------------------------------------------


@pytest.mark.parametrize("missing", REQUIRED_SETTINGS)
def test_missing_setting_is_named(
    write_config: Callable[..., Path], run_script: Callable[..., Run], missing: str
) -> None:
    """A missing required setting stops the deploy with a message naming it."""
    config = write_config(**{missing: None})
    done = run_script("deploy.sh", "--config", str(config), "--dry-run")
    assert done.result.returncode != 0
    assert f"missing setting {missing}" in done.result.stderr
    assert done.result.stdout == ""


def test_every_missing_setting_is_reported_at_once(
    write_config: Callable[..., Path], run_script: Callable[..., Run]
) -> None:
    """With several settings missing, each gets its own error line."""
    config = write_config(**dict.fromkeys(REQUIRED_SETTINGS))
    done = run_script("deploy.sh", "--config", str(config), "--dry-run")
    assert done.result.returncode != 0
    for name in REQUIRED_SETTINGS:
        assert f"error: missing setting {name}" in done.result.stderr


def test_worker_timeout_below_ack_deadline_is_refused(
    write_config: Callable[..., Path], run_script: Callable[..., Run]
) -> None:
    """deploy.sh will not deploy a worker that times out before the ack deadline."""
    config = write_config(ACK_DEADLINE_S="600", WORKER_TIMEOUT_S="300")
    done = run_script("deploy.sh", "--config", str(config), "--dry-run")
    assert done.result.returncode != 0
    assert "WORKER_TIMEOUT_S (300) is below ACK_DEADLINE_S (600)" in done.result.stderr
    assert done.result.stdout == ""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("REGOIN=us-central1", "unknown setting REGOIN"),
        ("not a setting", "expected KEY=VALUE"),
        ("ACK_DEADLINE_S=5", "ACK_DEADLINE_S must be a whole number from 10 to 600"),
        ("MAX_DELIVERY_ATTEMPTS=3", "MAX_DELIVERY_ATTEMPTS must be a whole number from 5 to 100"),
        ("MIN_RETRY_DELAY=10", "MIN_RETRY_DELAY must be a duration"),
        ("INGRESS_PUBLIC=yes", "INGRESS_PUBLIC must be true or false"),
        ("MODEL_ID=gemini-other", "MODEL_CONFIG has no entry for MODEL_ID gemini-other"),
        ("FIRESTORE_COLLECTION=jobs/x", "FIRESTORE_COLLECTION must be a collection id"),
        ("WORKER_SA=x", "WORKER_SA must be a service account id"),
    ],
    ids=["unknown", "malformed", "ack", "attempts", "delay", "bool", "model", "collection", "sa"],
)
def test_bad_setting_is_refused(
    write_config: Callable[..., Path], run_script: Callable[..., Run], line: str, message: str
) -> None:
    """A misspelt, malformed or out-of-range setting stops the deploy with a message."""
    config = write_config()
    config.write_text(config.read_text() + line + "\n")
    done = run_script("deploy.sh", "--config", str(config), "--dry-run")
    assert done.result.returncode != 0
    assert message in done.result.stderr
    assert done.result.stdout == ""


def test_missing_config_file_is_named(run_script: Callable[..., Run], tmp_path: Path) -> None:
    """Without its config file, deploy.sh says which file it looked for."""
    done = run_script("deploy.sh", "--config", str(tmp_path / "nowhere.env"), "--dry-run")
    assert done.result.returncode != 0
    assert f"config file not found: {tmp_path / 'nowhere.env'}" in done.result.stderr


# --- pubsub.sh and teardown.sh ----------------------------------------------

PUBSUB_BASE = (
    "--project", PROJECT, "--topic", "jobs", "--subscription", "jobs-push",
    "--push-endpoint", "http://127.0.0.1:8080/",
)  # fmt: skip


OIDC = ("--push-service-account", INVOKER_SA)


@pytest.mark.parametrize(
    ("extra", "present", "absent"),
    [
        ((), {"push-endpoint"}, {"push-auth-service-account", "dead-letter-topic", "ack-deadline"}),
        ((*OIDC, "--audience", "https://w"), {"push-auth-token-audience"}, {"dead-letter-topic"}),
        (OIDC, {"push-auth-service-account"}, {"push-auth-token-audience"}),
        (
            ("--dead-letter-topic", "jobs-dlt", "--max-delivery-attempts", "5"),
            {"dead-letter-topic", "max-delivery-attempts"},
            {"push-auth-service-account"},
        ),
        (
            ("--ack-deadline", "60", "--min-retry-delay", "1s", "--max-retry-delay", "60s"),
            {"ack-deadline", "min-retry-delay", "max-retry-delay"},
            {"max-delivery-attempts"},
        ),
    ],
    ids=["minimal", "oidc", "oidc-default-audience", "dead-letter", "deadline-and-retry"],
)
def test_pubsub_script_passes_only_the_options_given(
    run_script: Callable[..., Run], extra: tuple[str, ...], present: set[str], absent: set[str]
) -> None:
    """Each optional flag reaches gcloud only when its option is given."""
    done = run_script("pubsub.sh", *PUBSUB_BASE, *extra, "--dry-run")
    assert done.result.returncode == 0, done.result.stderr
    push = flags(done.one("gcloud", "pubsub", "subscriptions", "create", "jobs-push"))
    assert present <= push.keys()
    assert not absent & push.keys()


def test_pubsub_script_gives_the_dead_letter_topic_a_subscription(
    run_script: Callable[..., Run],
) -> None:
    """A dead-letter topic is created with a pull subscription, before the push one."""
    done = run_script("pubsub.sh", *PUBSUB_BASE, "--dead-letter-topic", "jobs-dlt", "--dry-run")
    assert done.result.returncode == 0, done.result.stderr
    assert [c[4] for c in done.find("gcloud", "pubsub", "topics", "create")] == ["jobs", "jobs-dlt"]
    dead = done.one("gcloud", "pubsub", "subscriptions", "create", "jobs-dlt-sub")
    assert flags(dead)["topic"] == "jobs-dlt"
    assert done.commands[-1][4] == "jobs-push"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--audience", "https://w"), "--audience needs --push-service-account"),
        (("--max-delivery-attempts", "5"), "--max-delivery-attempts needs --dead-letter-topic"),
        (("--ack-deadline", "700"), "ACK_DEADLINE must be a whole number from 10 to 600"),
        (("--min-retry-delay", "1m"), "MIN_RETRY_DELAY must be a duration"),
        (("--bogus", "x"), "unknown option --bogus"),
    ],
    ids=["audience-alone", "attempts-alone", "ack-range", "delay-format", "unknown"],
)
def test_pubsub_script_refuses_bad_options(
    run_script: Callable[..., Run], extra: tuple[str, ...], message: str
) -> None:
    """Inconsistent or out-of-range options stop pubsub.sh before anything runs."""
    done = run_script("pubsub.sh", *PUBSUB_BASE, *extra, "--dry-run")
    assert done.result.returncode != 0
    assert message in done.result.stderr
    assert done.result.stdout == ""


@pytest.mark.parametrize("option", ["--project", "--topic", "--subscription", "--push-endpoint"])
def test_pubsub_script_names_a_missing_option(run_script: Callable[..., Run], option: str) -> None:
    """Each required option, when left out, is named in the error."""
    at = PUBSUB_BASE.index(option)
    args = PUBSUB_BASE[:at] + PUBSUB_BASE[at + 2 :]
    done = run_script("pubsub.sh", *args, "--dry-run")
    assert done.result.returncode != 0
    assert f"error: missing option {option}" in done.result.stderr


@pytest.mark.parametrize("delete_data", [False, True], ids=["keep-data", "delete-data"])
def test_teardown_removes_what_deploy_created(
    write_config: Callable[..., Path], run_script: Callable[..., Run], delete_data: bool
) -> None:
    """Teardown deletes services, Pub/Sub, accounts and images; data only on request."""
    extra = ["--delete-data"] if delete_data else []
    done = run_script("teardown.sh", "--config", str(write_config()), "--dry-run", *extra)
    assert done.result.returncode == 0, done.result.stderr
    deleted = {(c[1], c[2], c[4]) for c in done.commands if c[3:4] == ["delete"]}
    assert {
        ("run", "services", "dispatcher-ingress"),
        ("run", "services", "dispatcher-worker"),
        ("pubsub", "subscriptions", "dispatcher-jobs-push"),
        ("pubsub", "subscriptions", "dispatcher-jobs-interactive-push"),
        ("pubsub", "subscriptions", "dispatcher-jobs-dead-letter-sub"),
        ("pubsub", "topics", "dispatcher-jobs"),
        ("pubsub", "topics", "dispatcher-jobs-interactive"),
        ("pubsub", "topics", "dispatcher-jobs-dead-letter"),
        ("iam", "service-accounts", INGRESS_SA),
        ("iam", "service-accounts", WORKER_SA),
        ("iam", "service-accounts", INVOKER_SA),
        ("artifacts", "repositories", "vertex-dispatcher"),
    } <= deleted
    assert bool(done.find("gcloud", "firestore", "databases", "delete")) is delete_data
    assert all("create" not in c and "deploy" not in c for c in done.commands)
