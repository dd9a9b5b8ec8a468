"""A stand-in for a kubelet's usage endpoints and NVIDIA's DCGM exporter, for tests that cannot run a real
kubelet (the machine's one real node belongs to the lifecycle run; kwok nodes have no kubelet).

It serves what they serve, in their format: `/metrics/cadvisor` with cAdvisor's explicit timestamps,
its `id`/`image`/`name` labels and the series that are not containers (the pod's own cgroup,
container="", and its sandbox, container="POD"), plus a series the cost model does not read;
`/metrics/resource` with the same two series and fewer labels; `/metrics` as a DCGM exporter with
its Kubernetes pod mapping. The CPU seconds counter grows at each container's vCPUs, integrated over
time, so changing a container's usage changes the counter's slope from then on, as on a real node.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Key = tuple[str, str, str]  # namespace, pod, container


@dataclass
class ContainerUsage:
    vcpus: float
    memory_bytes: float
    #: DCGM's GPU utilisation (percent) of the container's GPU; None: no GPU, no DCGM series.
    gpu_util_percent: float | None = None


class KubeletStandIn:
    """Serves the usage of `set` containers on 127.0.0.1 until `stop`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[Key, ContainerUsage] = {}
        #: CPU seconds so far and when they were last brought up to date, per container.
        self._cpu: dict[Key, tuple[float, float]] = {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                text = stand_in.exposition(self.path)
                if text is None:
                    self.send_error(404)
                    return
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.address = f"127.0.0.1:{self._server.server_address[1]}"

    def set(self, namespace: str, pod: str, container: str, usage: ContainerUsage) -> None:
        now = time.time()
        with self._lock:
            self._advance(now)
            self._usage[namespace, pod, container] = usage
            self._cpu.setdefault((namespace, pod, container), (0.0, now))

    def _advance(self, now: float) -> None:
        for key, (seconds, since) in self._cpu.items():
            self._cpu[key] = (seconds + self._usage[key].vcpus * max(now - since, 0.0), now)

    def exposition(self, path: str) -> str | None:
        now = time.time()
        stamp = int(now * 1000)
        with self._lock:
            self._advance(now)
            rows = [(key, self._usage[key], self._cpu[key][0]) for key in sorted(self._usage)]
        lines: list[str] = []
        if path == "/metrics/cadvisor":
            lines += ["# TYPE container_cpu_usage_seconds_total counter"]
            for (ns, pod, container), _, seconds in rows:
                lines.append(
                    f"container_cpu_usage_seconds_total{{{_cadvisor(ns, pod, container)}}} {seconds} {stamp}"
                )
            for ns, pod in sorted({(ns, pod) for (ns, pod, _), _, _ in rows}):
                total = sum(s for (n, p, _), _, s in rows if (n, p) == (ns, pod))
                lines.append(f"container_cpu_usage_seconds_total{{{_cadvisor(ns, pod, '')}}} {total} {stamp}")
                lines.append(f"container_cpu_usage_seconds_total{{{_cadvisor(ns, pod, 'POD')}}} 0.01 {stamp}")
            lines += ["# TYPE container_memory_working_set_bytes gauge"]
            for (ns, pod, container), usage, _ in rows:
                labels = _cadvisor(ns, pod, container)
                lines.append(f"container_memory_working_set_bytes{{{labels}}} {usage.memory_bytes} {stamp}")
            lines += ["# TYPE container_fs_usage_bytes gauge"]
            for (ns, pod, container), _, _ in rows:
                lines.append(f"container_fs_usage_bytes{{{_cadvisor(ns, pod, container)}}} 1e9 {stamp}")
        elif path == "/metrics/resource":
            lines += ["# TYPE container_cpu_usage_seconds_total counter"]
            for (ns, pod, container), _, seconds in rows:
                labels = f'container="{container}",namespace="{ns}",pod="{pod}"'
                lines.append(f"container_cpu_usage_seconds_total{{{labels}}} {seconds} {stamp}")
            lines += ["# TYPE container_memory_working_set_bytes gauge"]
            for (ns, pod, container), usage, _ in rows:
                labels = f'container="{container}",namespace="{ns}",pod="{pod}"'
                lines.append(f"container_memory_working_set_bytes{{{labels}}} {usage.memory_bytes} {stamp}")
        elif path == "/metrics":
            lines += ["# TYPE DCGM_FI_DEV_GPU_UTIL gauge"]
            for index, ((ns, pod, container), usage, _) in enumerate(rows):
                if usage.gpu_util_percent is not None:
                    lines.append(
                        f'DCGM_FI_DEV_GPU_UTIL{{gpu="{index}",UUID="GPU-{index}",'
                        f'modelName="NVIDIA H100 80GB HBM3",namespace="{ns}",pod="{pod}",'
                        f'container="{container}"}} {usage.gpu_util_percent}'
                    )
        else:
            return None
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _cadvisor(namespace: str, pod: str, container: str) -> str:
    return (
        f'container="{container}",id="/kubepods/burstable/pod-{pod}/{container}",image="tandem:dev",'
        f'name="{container}",namespace="{namespace}",pod="{pod}"'
    )
