"""Lean watch-backed caches of the objects the operator reconciles and owns, outside kopf.

kopf streams every object of a kind through its per-object machinery (a logger, a body view, handler
selection, the index update) and filters labels on the client: at thousands of objects that is most of
the operator's CPU. A cache here lists and watches one kind, selected by label on the server when it
can be, parses events straight from JSON into small immutable observations, and keeps them by key.
Readers get snapshots; `synced` says the first list is in; `on_change` says which key changed.

Each watched scope is an asyncio task on the operator's loop (kopf's), streaming through the one HTTP
client (`kubehttp`); a change calls `on_change` on the loop, which queues the key at once. Parsing an
event is the only CPU here (orjson, a few microseconds for a pod), so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import orjson

from tandem.operator import kube
from tandem.operator.metrics import WATCH_FRESHNESS

T = TypeVar("T")
#: (namespace, name): of the object itself, or of the owner named by a label's value.
Key = tuple[str, str]
#: The collection's URL path for a namespace (None: all namespaces), and its fixed query (a selector).
Lister = Callable[[str | None], tuple[str, dict[str, str]]]
log = logging.getLogger(__name__)
WATCH_SECONDS = 300
#: The client ends a watch this long after the server should have (a connection gone quiet).
STREAM_GRACE_SECONDS = 60
RETRY_SECONDS = 2.0


def labelled(api_version: str, plural: str, label: str) -> Lister:
    """Objects of a kind (`v1`, `pods`; `apps/v1`, `deployments`) that carry `label` (any value),
    selected by the API server."""
    return lambda namespace: (kube.api_path(api_version, plural, namespace), {"labelSelector": label})


def custom_objects(group: str, version: str, plural: str) -> Lister:
    """Every object of a custom resource."""
    return lambda namespace: (kube.api_path(f"{group}/{version}", plural, namespace), {})


class Lines:
    """Splits a watch's reply (one JSON event per line) into lines as its blocks arrive, handing each
    whole line to `on_line` at once: a quiet watch must not hold an event back until more data comes."""

    def __init__(self, on_line: Callable[[bytes], bool]) -> None:
        self._on_line = on_line
        self._rest = b""

    def feed(self, block: bytes) -> bool:
        """Take one block; False once `on_line` has asked to stop."""
        *whole, self._rest = (self._rest + block).split(b"\n")
        return all(self._on_line(line) for line in whole if line)

    def close(self) -> None:
        """The stream ended: hand on a last line cut off without its newline (its parser reports it)."""
        if self._rest:
            rest, self._rest = self._rest, b""
            self._on_line(rest)


def by_name(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return str(meta["namespace"]), str(meta["name"])


def by_label(label: str) -> Callable[[Mapping[str, Any]], Key]:
    """Key an object by its namespace and the value of `label` (the owner's name)."""

    def key(obj: Mapping[str, Any]) -> Key:
        meta = obj["metadata"]
        return str(meta["namespace"]), str(meta["labels"][label])

    return key


class WatchCache(Generic[T]):
    """Objects listed by `lister`, reduced by `observe` and grouped by `key` (several may share one)."""

    def __init__(
        self,
        name: str,
        lister: Lister,
        key: Callable[[Mapping[str, Any]], Key],
        observe: Callable[[Mapping[str, Any]], T],
        namespaces: Iterable[str] = (),
    ) -> None:
        self._name, self._lister, self._key_fn, self._observe = name, lister, key, observe
        self._namespaces = tuple(namespaces) or (None,)
        self._by_key: dict[Key, dict[str, T]] = {}
        self._key_of: dict[str, Key] = {}
        self._synced: set[str | None] = set()
        self._stopped = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Called on the loop with a key whose objects changed (after the cache has them).
        self.on_change: Callable[[Key], None] | None = None
        #: For the watch-freshness gauge: the resource, and when the API server was last heard from.
        self.name = name
        self.last_event: float | None = None
        WATCH_FRESHNESS.caches.add(self)

    @property
    def synced(self) -> bool:
        """True once every watched scope has been listed: before that, absence proves nothing."""
        return len(self._synced) == len(self._namespaces)

    @property
    def alive(self) -> bool:
        """Every watch task is running (they catch and retry every error; one that ended is a bug)."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    def get(self, key: Key) -> list[T]:
        return list(self._by_key.get(key, {}).values())

    def entries(self) -> list[tuple[Key, T]]:
        """Every object with its key: a snapshot."""
        return [(key, obj) for key, objs in self._by_key.items() for obj in objs.values()]

    def keys_where(self, test: Callable[[T], bool]) -> list[Key]:
        """Keys with at least one object that passes `test`."""
        return [key for key, objs in self._by_key.items() if any(test(obj) for obj in objs.values())]

    def start(self) -> None:
        """Start one list-and-watch task per watched scope on the running loop."""
        loop = asyncio.get_running_loop()
        for namespace in self._namespaces:
            name = f"watch {self._name} in {namespace or 'all namespaces'}"
            self._tasks.append(loop.create_task(self._run(namespace), name=name))

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the list + watch loop ---------------------------------------------------------------------

    async def _run(self, namespace: str | None) -> None:
        while not self._stopped:
            try:
                version = await self._list(namespace)
                while not self._stopped:
                    version = await self._watch(namespace, version)
            except Exception as error:  # a dropped connection or an expired version: list again
                log.warning("%s watch (%s) restarting: %s", self._name, namespace or "all namespaces", error)
                await asyncio.sleep(RETRY_SECONDS)

    async def _list(self, namespace: str | None) -> str:
        path, query = self._lister(namespace)
        reply = orjson.loads(await kube.request("GET", path, query=query))
        fresh: dict[Key, dict[str, T]] = {}
        key_of: dict[str, Key] = {}
        for obj in reply["items"]:
            uid, key = obj["metadata"]["uid"], self._key_fn(obj)
            fresh.setdefault(key, {})[uid] = self._observe(obj)
            key_of[uid] = key
        touched = {key for key in self._key_of.values() if namespace in (None, key[0])} | set(fresh)
        if namespace is None:
            self._by_key, self._key_of = fresh, key_of
        else:  # replace this namespace's pods only
            stale = [uid for uid, key in self._key_of.items() if key[0] == namespace]
            for uid in stale:
                self._forget(uid)
            for key, objs in fresh.items():
                self._by_key.setdefault(key, {}).update(objs)
            self._key_of.update(key_of)
        self._synced.add(namespace)
        self.last_event = time.time()
        for key in touched:
            self._changed(key)
        return str(reply["metadata"]["resourceVersion"])

    async def _watch(self, namespace: str | None, version: str) -> str:
        started = time.monotonic()
        path, query = self._lister(namespace)
        options = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        seen = [version]

        def on_line(line: bytes) -> bool:
            event = orjson.loads(line)  # a third of json's time: thousands of events a minute
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                raise RuntimeError(obj.get("message", "watch error"))
            seen[0] = obj["metadata"]["resourceVersion"]
            self.last_event = time.time()
            if kind != "BOOKMARK":
                self._apply(kind, obj)
            return not self._stopped

        lines = Lines(on_line)
        await kube.watch(path, query | options, lines.feed, timeout=WATCH_SECONDS + STREAM_GRACE_SECONDS)
        if not self._stopped:
            lines.close()
        if time.monotonic() - started < 1 and not self._stopped:
            await asyncio.sleep(RETRY_SECONDS)  # a stream that ends at once must not spin
        return seen[0]

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        key = self._key_of.get(uid) or self._key_fn(obj)
        if kind == "DELETED":
            self._forget(uid)
            changed = True
        else:
            seen = self._by_key.setdefault(key, {})
            observed = self._observe(obj)
            changed = seen.get(uid) != observed
            seen[uid] = observed
            self._key_of[uid] = key
        if changed:  # an update that changes nothing the reconciler reads wakes nobody
            self._changed(key)

    def _changed(self, key: Key) -> None:
        if self.on_change is not None:
            self.on_change(key)

    def _forget(self, uid: str) -> None:
        key = self._key_of.pop(uid, None)
        if key is not None:
            objs = self._by_key.get(key, {})
            objs.pop(uid, None)
            if not objs:
                self._by_key.pop(key, None)


def owned(
    api_version: str,
    plural: str,
    label: str,
    observe: Callable[[Mapping[str, Any]], T],
    namespaces: Iterable[str] = (),
) -> WatchCache[T]:
    """Children of a built-in kind that carry the owner label `label` (selected by the API server),
    grouped by owner: (namespace, label value). See `labelled` for `api_version` and `plural`."""
    name = f"{plural} by {label}"
    return WatchCache(name, labelled(api_version, plural, label), by_label(label), observe, namespaces)
