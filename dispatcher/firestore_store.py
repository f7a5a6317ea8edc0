"""The job store on Firestore: every Firestore call of the project is in this file.

Layout: one document per job in the configured collection. The request and the
result are stored as JSON: inline when small, otherwise as UTF-8 bytes split into
chunk documents in the job's `blobs` subcollection, because one document holds at
most 1 MiB (https://cloud.google.com/firestore/quotas#limits) while a request may
be 8 MiB and a response larger. Chunks are written before the job document points
at them, each in its own small commit (a gRPC message is capped at 4 MiB), under a
fresh blob id, so a failed or retried update leaves at most orphan chunks that
the TTL policy deletes (each carries `expire_at`). Blobs never change once written;
only the small job document is updated, by optimistic concurrency (a read, then a
write with the read's update time as precondition).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.query import Query
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random

from dispatcher.errors import CorruptRecord, JobExists, StoreUnavailable
from dispatcher.jobs import Job, JobStatus, JsonObject
from dispatcher.metrics import STORE_OPERATIONS
from dispatcher.region_board import SharedRegion
from dispatcher.store import Change, JobQuery

log = logging.getLogger(__name__)

INLINE_LIMIT = 256 * 1024  # bytes of JSON kept in the job document itself
CHUNK_BYTES = 512 * 1024
CHUNKS_PER_COMMIT = 4  # ~2 MiB a commit, well under the 4 MiB gRPC message cap
CONFLICT_ATTEMPTS = 20  # reads and conditional writes of one update under contention
KNOWN_MAX = 10_000  # records remembered for their next update (see `_Known`)
_BLOBS = ("request", "result")


class _BlobNeeded(Exception):
    """Raised while encoding: a large blob must be written first, in its own commits."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data


@dataclass(frozen=True, slots=True)
class _Known:
    """A record as this process last wrote it, and the write's time (its precondition)."""

    stored: JsonObject
    job: Job
    update_time: Any


class FirestoreJobStore:
    """Job records in one Firestore collection, changed only by conditional writes."""

    def __init__(self, client: firestore.AsyncClient, collection: str) -> None:
        self._client = client
        self._collection = client.collection(collection)
        # Unfinished records this process wrote last, oldest first: the runs under way
        # here, and a few given back whose next run went elsewhere (bounded).
        self._known: dict[str, _Known] = {}

    @classmethod
    def connect(cls, *, project: str, database: str, collection: str) -> FirestoreJobStore:
        """A store with its own client (honours FIRESTORE_EMULATOR_HOST)."""
        return cls(firestore.AsyncClient(project=project, database=database), collection)

    def region_board_store(
        self, ttl_s: float, *, instances: str = "instances"
    ) -> FirestoreRegionBoardStore:
        """The shared region records beside this collection, on the same client.

        Args:
            ttl_s: How long a heartbeat document lives (its `expire_at`).
            instances: The suffix of the heartbeats' collection: the instances that
                call Vertex (`instances`) are counted apart from the mode-3 ingresses
                (`ingress_instances`), which only share the API keys' rates.
        """
        return FirestoreRegionBoardStore(
            self._client, self._collection.id, ttl_s, instances=instances
        )

    async def create(self, job: Job) -> None:
        """Write a new job: large blobs first, then the document (the idempotency gate)."""
        STORE_OPERATIONS.labels("create").inc()
        ref = self._collection.document(job.job_id)
        try:
            written: dict[str, tuple[str, int]] = {}
            while True:
                try:
                    doc = _encode(job.to_doc(), previous=None, written=written)
                    break
                except _BlobNeeded as need:
                    written[need.name] = await self._write_blob(ref, need.data, job.expire_at)
            await ref.create(doc)
        except google_exceptions.AlreadyExists as exc:
            raise JobExists(f"job {job.job_id} already exists") from exc
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore write failed: {exc}") from exc

    async def get(self, job_id: str) -> Job | None:
        """Read one job, its blobs included."""
        STORE_OPERATIONS.labels("get").inc()
        ref = self._collection.document(job_id)
        try:
            snapshot = await ref.get()
            if not snapshot.exists:
                return None
            return await self._decode(ref, snapshot.to_dict() or {})
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore read failed: {exc}") from exc

    async def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """Read several jobs in one batched request."""
        STORE_OPERATIONS.labels("get_many").inc()
        refs = [self._collection.document(job_id) for job_id in job_ids]
        try:
            found = [
                await self._decode_or_skip(snapshot)
                async for snapshot in self._client.get_all(refs)
                if snapshot.exists
            ]
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore read failed: {exc}") from exc
        return {job.job_id: job for job in found if job is not None}

    async def update(self, job_id: str, change: Change) -> Job | None:
        """Apply `change` by optimistic concurrency: read, then write if unchanged since.

        The write carries the read's `update_time` as a precondition, so it fails
        (FailedPrecondition) when another writer came between, and the change runs
        again on the fresh record. Two round trips instead of a transaction's three
        (begin, read, commit), and no lock held between them: the emulator holds
        transaction locks long under contention, and a lock is not needed for one
        document. When this process wrote the record last (a claim, then its result),
        the read is skipped: the precondition still catches any writer since.
        """
        STORE_OPERATIONS.labels("update").inc()
        ref = self._collection.document(job_id)
        written: dict[str, tuple[str, int]] = {}
        try:
            try:
                return await self._update_once(ref, change, written, self._known.pop(job_id, None))
            except (google_exceptions.FailedPrecondition, google_exceptions.NotFound):
                pass
            # Another writer came between (a lease renewal racing a duplicate delivery):
            # a short random pause lets it finish, then the change runs on its result.
            # Only now is the retry machinery built: most updates meet no conflict.
            retrying = AsyncRetrying(
                stop=stop_after_attempt(CONFLICT_ATTEMPTS),
                wait=wait_random(0.01, 0.2),
                retry=retry_if_exception(_is_conflict),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self._update_once(ref, change, written, None)
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore update failed: {exc}") from exc
        raise AssertionError("unreachable: tenacity either returns or reraises")  # pragma: no cover

    async def _update_once(
        self,
        ref: Any,
        change: Change,
        written: dict[str, tuple[str, int]],
        known: _Known | None,
    ) -> Job | None:
        """One read (unless `known`), change and conditional write."""
        if known is None:
            snapshot = await ref.get()
            if not snapshot.exists:
                return None
            stored = snapshot.to_dict() or {}
            known = _Known(stored, await self._decode(ref, stored), snapshot.update_time)
        changed = change(known.job)
        if changed is None:
            self._remember(ref.id, known)
            return known.job
        fields = await self._fields(ref, changed, known.stored, written)
        if not fields:
            return changed
        result = await ref.update(
            fields, option=self._client.write_option(last_update_time=known.update_time)
        )
        if not changed.status.is_terminal:
            self._remember(ref.id, _Known({**known.stored, **fields}, changed, result.update_time))
        return changed

    def _remember(self, job_id: str, known: _Known) -> None:
        """Keep an unfinished record this process wrote last, for its next update."""
        self._known[job_id] = known
        if len(self._known) > KNOWN_MAX:
            del self._known[next(iter(self._known))]  # the oldest: its run moved elsewhere

    async def _fields(
        self, ref: Any, job: Job, stored: JsonObject, written: dict[str, tuple[str, int]]
    ) -> JsonObject:
        """The changed fields of `job`, writing a large new blob first where one is needed."""
        while True:
            try:
                return _encode(job.to_doc(), previous=stored, written=written)
            except _BlobNeeded as need:
                written[need.name] = await self._write_blob(ref, need.data, job.expire_at)

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """The jobs the query selects, newest first.

        Served by the composite indexes `infra/deploy.sh` creates on the collection
        group: (owner, created_at desc, job_id desc) and (owner, status, created_at desc,
        job_id desc).
        """
        STORE_OPERATIONS.labels("query").inc()
        selected = self._owned(query.owner, query.since)
        if query.status is not None:
            selected = selected.where(filter=FieldFilter("status", "==", query.status.value))
        selected = selected.order_by("created_at", direction=Query.DESCENDING).order_by(
            "job_id", direction=Query.DESCENDING
        )
        if query.after is not None:
            created_at, job_id = query.after
            selected = selected.start_after({"created_at": created_at, "job_id": job_id})
        try:
            found = [
                await self._decode_or_skip(snapshot)
                async for snapshot in selected.limit(query.limit).stream()
            ]
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore query failed: {exc}") from exc
        return [job for job in found if job is not None]

    async def count_by_status(
        self, owner: str | None, since: datetime | None
    ) -> dict[JobStatus, int]:
        """How many of the owner's jobs are in each state: one count aggregation each."""
        counts: dict[JobStatus, int] = {}
        for status in JobStatus:
            STORE_OPERATIONS.labels("count").inc()
            counted = self._owned(owner, since).where(
                filter=FieldFilter("status", "==", status.value)
            )
            try:
                results = await counted.count().get()
            except google_exceptions.GoogleAPIError as exc:
                raise StoreUnavailable(f"Firestore query failed: {exc}") from exc
            counts[status] = int(results[0][0].value) if results and results[0] else 0
        return counts

    def _owned(self, owner: str | None, since: datetime | None) -> Any:
        selected = self._collection.where(filter=FieldFilter("owner", "==", owner))
        if since is not None:
            selected = selected.where(filter=FieldFilter("created_at", ">=", since))
        return selected

    async def due(self, now: datetime, limit: int) -> list[Job]:
        """Jobs whose `sweep_at` has passed.

        A single-field range query, served by Firestore's automatic index: no
        composite index to deploy. Terminal jobs have `sweep_at` null and never match.
        """
        STORE_OPERATIONS.labels("query").inc()
        query = (
            self._collection.where(filter=FieldFilter("sweep_at", "<=", now))
            .order_by("sweep_at")
            .limit(limit)
        )
        try:
            found = [await self._decode_or_skip(snapshot) async for snapshot in query.stream()]
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore query failed: {exc}") from exc
        return [job for job in found if job is not None]

    async def close(self) -> None:
        """Close the client's channels."""
        self._client.close()  # type: ignore[no-untyped-call]  # the client is untyped here

    async def _write_blob(
        self, ref: Any, data: bytes, expire_at: datetime | None
    ) -> tuple[str, int]:
        """Write `data` as chunk documents under a fresh id; returns (id, chunk count)."""
        blob_id = secrets.token_hex(6)
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
        blobs = ref.collection("blobs")
        for start in range(0, len(chunks), CHUNKS_PER_COMMIT):
            batch = self._client.batch()
            for index in range(start, min(start + CHUNKS_PER_COMMIT, len(chunks))):
                batch.set(
                    blobs.document(f"{blob_id}-{index}"),
                    {"data": chunks[index], "expire_at": expire_at},
                )
            await batch.commit()
        return blob_id, len(chunks)

    async def _decode(self, ref: Any, stored: JsonObject) -> Job:
        """The job a stored document holds.

        Raises:
            CorruptRecord: the document is not a job record this code can read (a
                permanent fault of that record, never retried as StoreUnavailable).
        """
        try:
            return await self._decode_fields(ref, stored)
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise CorruptRecord(
                f"job {ref.id}: the stored record cannot be decoded: {exc!r}"[:500]
            ) from exc

    async def _decode_or_skip(self, snapshot: Any) -> Job | None:
        """The snapshot's job, or None (logged) for a corrupt record, so that one bad
        record does not stop a batch read (the watcher's, the sweep's) for ever."""
        try:
            return await self._decode(snapshot.reference, snapshot.to_dict() or {})
        except CorruptRecord as exc:
            log.error("corrupt job record skipped", extra={"reason": str(exc)})
            return None

    async def _decode_fields(self, ref: Any, stored: JsonObject) -> Job:
        doc = dict(stored)
        for blob in _BLOBS:
            inline = doc.pop(f"{blob}_json", None)
            blob_id = doc.pop(f"{blob}_blob", None)
            chunks = int(doc.pop(f"{blob}_chunks", 0) or 0)
            if blob_id and chunks:
                blobs = ref.collection("blobs")
                parts = [await blobs.document(f"{blob_id}-{i}").get() for i in range(chunks)]
                data = b"".join(bytes((part.to_dict() or {}).get("data", b"")) for part in parts)
                doc[blob] = json.loads(data)
            else:
                doc[blob] = json.loads(inline) if inline else None
        return Job.from_doc(doc)


class FirestoreRegionBoardStore:
    """The shared region records and instance heartbeats, beside the job collection.

    `{collection}_regions/{region}` holds one region's `SharedRegion` fields, each
    written alone (merge), so an opening and a capacity written by two instances do
    not overwrite each other. `{collection}_instances/{id}` holds one heartbeat per
    instance (one writer each) with `expire_at` for the TTL policy; counting them is
    one aggregation query on a single field, served by the automatic index.
    """

    def __init__(
        self,
        client: firestore.AsyncClient,
        collection: str,
        ttl_s: float,
        *,
        instances: str = "instances",
    ) -> None:
        self._regions = client.collection(f"{collection}_regions")
        self._instances = client.collection(f"{collection}_{instances}")
        self._client = client
        self._ttl_s = ttl_s

    async def read_regions(self, regions: Sequence[str]) -> dict[str, SharedRegion]:
        """The records among `regions`, in one batched read."""
        STORE_OPERATIONS.labels("region_read").inc()
        refs = [self._regions.document(region) for region in regions]
        try:
            return {
                snapshot.id: _shared_region(snapshot.id, snapshot.to_dict() or {})
                async for snapshot in self._client.get_all(refs)
                if snapshot.exists
            }
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore read failed: {exc}") from exc

    async def write_region(self, record: SharedRegion, fields: Sequence[str]) -> None:
        """Merge `fields` of the record into its document."""
        STORE_OPERATIONS.labels("region_write").inc()
        doc = {name: getattr(record, name) for name in fields}
        try:
            await self._regions.document(record.region).set(doc, merge=True)
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore write failed: {exc}") from exc

    async def beat(self, instance_id: str, at: float) -> None:
        """Write this instance's heartbeat."""
        STORE_OPERATIONS.labels("heartbeat").inc()
        expire_at = datetime.fromtimestamp(at + self._ttl_s, UTC)
        try:
            await self._instances.document(instance_id).set({"seen_at": at, "expire_at": expire_at})
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore write failed: {exc}") from exc

    async def count_instances(self, since: float) -> int:
        """Heartbeats at or after `since`, counted server-side."""
        STORE_OPERATIONS.labels("instance_count").inc()
        query = self._instances.where(filter=FieldFilter("seen_at", ">=", since)).count()
        try:
            results = await query.get()  # type: ignore[call-arg]  # count() is typed as returning the class
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore query failed: {exc}") from exc
        return int(results[0][0].value) if results and results[0] else 0


def _shared_region(region: str, doc: dict[str, Any]) -> SharedRegion:
    capacity = doc.get("capacity")
    return SharedRegion(
        region=region,
        capacity=float(capacity) if isinstance(capacity, int | float) else None,
        capacity_at=float(doc.get("capacity_at") or 0.0),
        opened_at=float(doc.get("opened_at") or 0.0),
        open_until=float(doc.get("open_until") or 0.0),
        opened_by=str(doc.get("opened_by") or ""),
    )


def _is_conflict(exc: BaseException) -> bool:
    """Another writer changed (or removed) the document between the read and the write."""
    return isinstance(exc, google_exceptions.FailedPrecondition | google_exceptions.NotFound)


def _encode(
    doc: JsonObject, *, previous: JsonObject | None, written: dict[str, tuple[str, int]]
) -> JsonObject:
    """The Firestore fields of a job document.

    With `previous` (the stored fields), only changed fields are returned, and a
    blob already stored is not written again: blobs are write-once. A blob too
    large for the document raises `_BlobNeeded` unless `written` has its chunks.
    """
    fields: JsonObject = {}
    for key, value in doc.items():
        if key in _BLOBS:
            already = previous is not None and (
                previous.get(f"{key}_json") or previous.get(f"{key}_chunks")
            )
            if value is None or already:
                continue
            if key in written:
                fields[f"{key}_blob"], fields[f"{key}_chunks"] = written[key]
                continue
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            data = text.encode()
            if len(data) > INLINE_LIMIT:
                raise _BlobNeeded(key, data)
            fields[f"{key}_json"] = text
        elif previous is None or previous.get(key) != value:
            fields[key] = value
    return fields
