"""A lean watch-backed cache of the operator's own pods, outside kopf.

kopf would stream every pod in the cluster through its per-object machinery to feed an index; at
thousands of pods that costs a core and a gigabyte. This cache lists and watches only pods that carry
a given label (selected by the API server), parses events straight from JSON into small immutable
observations, and keeps them by owner key. Readers get snapshots; `synced` says the first list is in.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from tandem.operator import kube

T = TypeVar("T")
#: (namespace, owner name): the value of the owner label is the owner's name.
Key = tuple[str, str]
log = logging.getLogger(__name__)
WATCH_SECONDS = 300
RETRY_SECONDS = 2.0


class PodCache(Generic[T]):
    """Pods with `label` present, reduced by `observe` and grouped by owner: (namespace, label value)."""

    def __init__(
        self,
        label: str,
        observe: Callable[[Mapping[str, Any]], T],
        namespaces: Iterable[str] = (),
    ) -> None:
        self._label, self._observe = label, observe
        self._namespaces = tuple(namespaces) or (None,)
        self._lock = threading.Lock()
        self._by_key: dict[Key, dict[str, T]] = {}
        self._key_of: dict[str, Key] = {}
        self._synced: set[str | None] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Called from the watch thread with an owner key whose pods changed (after the cache has them).
        self.on_change: Callable[[Key], None] | None = None

    @property
    def synced(self) -> bool:
        """True once every watched scope has been listed: before that, absence proves nothing."""
        with self._lock:
            return len(self._synced) == len(self._namespaces)

    def _key(self, pod: Mapping[str, Any]) -> tuple[str, str]:
        meta = pod["metadata"]
        return str(meta["namespace"]), str(meta["labels"][self._label])

    def get(self, key: Key) -> list[T]:
        with self._lock:
            return list(self._by_key.get(key, {}).values())

    def start(self) -> None:
        for namespace in self._namespaces:
            thread = threading.Thread(
                target=self._run, args=(namespace,), name=f"podcache-{namespace or 'all'}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    # -- the list + watch loop ---------------------------------------------------------------------

    def _run(self, namespace: str | None) -> None:
        while not self._stop.is_set():
            try:
                version = self._list(namespace)
                while not self._stop.is_set():
                    version = self._watch(namespace, version)
            except Exception as error:  # a dropped connection or an expired version: list again
                log.warning("pod watch (%s) restarting: %s", namespace or "all namespaces", error)
                self._stop.wait(RETRY_SECONDS)

    def _call(self, namespace: str | None, **kwargs: Any) -> Any:
        from kubernetes import client

        core = client.CoreV1Api(kube.api_client())
        if namespace is None:
            return core.list_pod_for_all_namespaces(
                label_selector=self._label, _preload_content=False, **kwargs
            )
        return core.list_namespaced_pod(
            namespace, label_selector=self._label, _preload_content=False, **kwargs
        )

    def _list(self, namespace: str | None) -> str:
        reply = json.loads(kube.finish(self._call(namespace)))
        fresh: dict[Key, dict[str, T]] = {}
        key_of: dict[str, Key] = {}
        for pod in reply["items"]:
            uid, key = pod["metadata"]["uid"], self._key(pod)
            fresh.setdefault(key, {})[uid] = self._observe(pod)
            key_of[uid] = key
        with self._lock:
            touched = {key for key in self._key_of.values() if namespace in (None, key[0])} | set(fresh)
            if namespace is None:
                self._by_key, self._key_of = fresh, key_of
            else:  # replace this namespace's pods only
                stale = [uid for uid, key in self._key_of.items() if key[0] == namespace]
                for uid in stale:
                    self._forget(uid)
                for key, pods in fresh.items():
                    self._by_key.setdefault(key, {}).update(pods)
                self._key_of.update(key_of)
            self._synced.add(namespace)
        for key in touched:
            self._changed(key)
        return str(reply["metadata"]["resourceVersion"])

    def _watch(self, namespace: str | None, version: str) -> str:
        started = time.monotonic()
        stream = self._call(
            namespace,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
        )
        try:
            for line in stream:
                event = json.loads(line)
                kind, pod = event["type"], event["object"]
                if kind == "ERROR":
                    raise RuntimeError(pod.get("message", "watch error"))
                version = pod["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self._apply(kind, pod)
                if self._stop.is_set():
                    break
        finally:
            stream.release_conn()
        if time.monotonic() - started < 1 and not self._stop.is_set():
            self._stop.wait(RETRY_SECONDS)  # a stream that ends at once must not spin
        return version

    def _apply(self, kind: str, pod: Mapping[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            key = self._key_of.get(uid) or self._key(pod)
            if kind == "DELETED":
                self._forget(uid)
                changed = True
            else:
                seen = self._by_key.setdefault(key, {})
                observed = self._observe(pod)
                changed = seen.get(uid) != observed
                seen[uid] = observed
                self._key_of[uid] = key
        if changed:  # a pod update that changes nothing the reconciler reads wakes nobody
            self._changed(key)

    def _changed(self, key: Key) -> None:
        if self.on_change is not None:
            try:
                self.on_change(key)
            except RuntimeError:  # the event loop is closing: nobody left to wake
                log.debug("pod change for %s after shutdown", key)

    def _forget(self, uid: str) -> None:
        key = self._key_of.pop(uid, None)
        if key is not None:
            pods = self._by_key.get(key, {})
            pods.pop(uid, None)
            if not pods:
                self._by_key.pop(key, None)
