"""The job store on Firestore: every Firestore call of the project is in this file.

Layout: one document per job in the configured collection. The request and the
result are stored as JSON text: inline when small, otherwise split into chunk
documents in the job's `blobs` subcollection, because one document holds at most
1 MiB (https://cloud.google.com/firestore/quotas#limits) while a request may be
8 MiB and a response larger. Blobs never change once written, so they are read
outside transactions; only the small job document takes part in them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from dispatcher.errors import JobExists, StoreUnavailable
from dispatcher.jobs import Job, JsonObject
from dispatcher.store import Change

# JSON is written with ensure_ascii, so one character is one byte.
INLINE_LIMIT = 256 * 1024
CHUNK_BYTES = 512 * 1024
_BLOBS = ("request", "result")


class FirestoreJobStore:
    """Job records in one Firestore collection, changed only inside transactions."""

    def __init__(self, client: firestore.AsyncClient, collection: str) -> None:
        self._client = client
        self._collection = client.collection(collection)

    @classmethod
    def connect(cls, *, project: str, database: str, collection: str) -> FirestoreJobStore:
        """A store with its own client (honours FIRESTORE_EMULATOR_HOST)."""
        return cls(firestore.AsyncClient(project=project, database=database), collection)

    async def create(self, job: Job) -> None:
        """Write a new job and its request blob in one batch."""
        ref = self._collection.document(job.job_id)
        doc, blob_writes = _encode(job.to_doc(), previous=None)
        batch = self._client.batch()
        batch.create(ref, doc)
        for name, text in blob_writes:
            batch.set(ref.collection("blobs").document(name), {"text": text})
        try:
            await batch.commit()
        except google_exceptions.AlreadyExists as exc:
            raise JobExists(f"job {job.job_id} already exists") from exc
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore write failed: {exc}") from exc

    async def get(self, job_id: str) -> Job | None:
        """Read one job, its blobs included."""
        ref = self._collection.document(job_id)
        try:
            snapshot = await ref.get()
            if not snapshot.exists:
                return None
            return await self._decode(ref, snapshot.to_dict() or {})
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore read failed: {exc}") from exc

    async def update(self, job_id: str, change: Change) -> Job | None:
        """Apply `change` in a transaction (retried by the client on contention)."""
        ref = self._collection.document(job_id)

        @firestore.async_transactional
        async def apply(transaction: firestore.AsyncTransaction) -> Job | None:
            snapshot = await ref.get(transaction=transaction)
            if not snapshot.exists:
                return None
            stored = snapshot.to_dict() or {}
            current = await self._decode(ref, stored)
            changed = change(current)
            if changed is None:
                return current
            fields, blob_writes = _encode(changed.to_doc(), previous=stored)
            for name, text in blob_writes:
                transaction.set(ref.collection("blobs").document(name), {"text": text})
            if fields:
                transaction.update(ref, fields)
            return changed

        try:
            result: Job | None = await apply(self._client.transaction())
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore transaction failed: {exc}") from exc
        return result

    async def due(self, now: datetime, limit: int) -> list[Job]:
        """Jobs whose `sweep_at` has passed.

        A single-field range query, served by Firestore's automatic index: no
        composite index to deploy. Terminal jobs have `sweep_at` null and never match.
        """
        query = (
            self._collection.where(filter=FieldFilter("sweep_at", "<=", now))
            .order_by("sweep_at")
            .limit(limit)
        )
        try:
            return [
                await self._decode(snapshot.reference, snapshot.to_dict() or {})
                async for snapshot in query.stream()
            ]
        except google_exceptions.GoogleAPIError as exc:
            raise StoreUnavailable(f"Firestore query failed: {exc}") from exc

    async def close(self) -> None:
        """Close the client's channels."""
        self._client.close()  # type: ignore[no-untyped-call]  # the client is untyped here

    async def _decode(self, ref: Any, stored: JsonObject) -> Job:
        doc = dict(stored)
        for blob in _BLOBS:
            inline = doc.pop(f"{blob}_json", None)
            chunks = int(doc.pop(f"{blob}_chunks", 0) or 0)
            if chunks:
                blobs = ref.collection("blobs")
                parts = [await blobs.document(f"{blob}-{i}").get() for i in range(chunks)]
                inline = "".join(str((part.to_dict() or {}).get("text", "")) for part in parts)
            doc[blob] = json.loads(inline) if inline else None
        return Job.from_doc(doc)


def _encode(doc: JsonObject, *, previous: JsonObject | None) -> tuple[JsonObject, list[Any]]:
    """Split a job document into its Firestore fields and blob chunk writes.

    With `previous` (the stored fields), only changed fields are returned, and a
    blob already stored is not written again: blobs are write-once.
    """
    fields: JsonObject = {}
    blob_writes: list[tuple[str, str]] = []
    for key, value in doc.items():
        if key in _BLOBS:
            already = previous is not None and (
                previous.get(f"{key}_json") or previous.get(f"{key}_chunks")
            )
            if value is None or already:
                continue
            text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
            if len(text) <= INLINE_LIMIT:
                fields[f"{key}_json"] = text
            else:
                pieces = [text[i : i + CHUNK_BYTES] for i in range(0, len(text), CHUNK_BYTES)]
                blob_writes.extend((f"{key}-{i}", piece) for i, piece in enumerate(pieces))
                fields[f"{key}_chunks"] = len(pieces)
        elif previous is None or previous.get(key) != value:
            fields[key] = value
    return fields, blob_writes
