"""The gRPC side of ADS: one bidirectional stream, kept alive.

The receiving loop never does slow work: responses go to a worker thread
that translates and applies them and queues the ACK/NACK, and when several
responses of one type are waiting only the newest is processed (istiod only
cares about the latest nonce per type). A lost stream is retried with capped
exponential backoff and jitter; meanwhile the maps stay as they are, so
traffic keeps flowing, and the new stream resubscribes with the versions
already held.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from kmesh import limits, memory
from kmesh.xds.node import XdsTarget
from kmesh.xds.state import AdsState

log = logging.getLogger("kmesh.xds")

BACKOFF_BASE = 0.5
TRIM_AFTER_BYTES = 1 << 20
BACKOFF_CAP = 30.0
_STOP = object()


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
                  rand: random.Random | None = None) -> float:
    """'Full jitter' backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    r = rand or random
    return r.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def _channel(target: XdsTarget) -> grpc.Channel:
    opts = [("grpc.keepalive_time_ms", 30000), ("grpc.max_receive_message_length", target.max_message_bytes)]
    if not target.tls:
        return grpc.insecure_channel(target.address, options=opts)
    with open(target.ca_file, "rb") as f:
        ca = f.read()
    cert = key = None
    if target.cert_file:
        with open(target.cert_file, "rb") as f:
            cert = f.read()
        with open(target.key_file or target.cert_file, "rb") as f:
            key = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(target.address, creds, options=opts)


class AdsClient:
    def __init__(self, target: XdsTarget, state: AdsState):
        self.target = target
        self.state = state
        self.connection = {"state": "idle", "since": time.time(), "error": None, "attempts": 0, "streams": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ads", daemon=True)
        self._call = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() or not self._thread.ident

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._thread.join(timeout=5)

    def _set(self, state: str, error: str | None = None) -> None:
        # While (re)connecting, keep showing why the last attempt failed.
        if state == "connecting":
            error = self.connection.get("error")
        self.connection.update(state=state, since=time.time(), error=error)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._set("connecting")
            got_response = self._stream_once()
            if self._stop.is_set():
                break
            attempt = 0 if got_response else attempt + 1
            delay = backoff_delay(attempt)
            self.connection["attempts"] = attempt
            log.warning("xDS stream closed; maps stay as they are; retrying",
                        extra={"kv": {"server": self.target.address, "error": self.connection["error"],
                                      "retry_in_s": round(delay, 2)}})
            self._set("disconnected", self.connection["error"])
            self._stop.wait(delay)
        self._set("stopped")

    def _stream_once(self) -> bool:
        """Run one stream to its end; True if it delivered any response."""
        requests: queue.Queue = queue.Queue()
        work: queue.Queue = queue.Queue()
        got = False

        def request_iter():
            while True:
                item = requests.get()
                if item is _STOP:
                    return
                yield item

        worker = threading.Thread(target=self._work, args=(work, requests), name="ads-apply", daemon=True)
        worker.start()
        channel = _channel(self.target)
        try:
            for req in self.state.on_connect():
                requests.put(req)
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(request_iter())
            with self._lock:
                self._call = call
            for resp in call:
                if not got:
                    got = True
                    self.connection["streams"] += 1
                    self._set("connected")
                    log.info("xDS stream up", extra={"kv": {"server": self.target.address}})
                work.put(resp)
                resp = None  # the worker owns it now; do not keep it alive here
            self.connection["error"] = "the server closed the stream"
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                limits.hit(limits.XDS_MESSAGE)
                log.error("an xDS message was over the size limit: the stream restarts", extra={"kv": {
                    "limit_bytes": self.target.max_message_bytes, "set_by": "dynamic_resources.ads_config."
                    "grpc_services[0].envoy_grpc.max_receive_message_length"}})
            self.connection["error"] = f"{code.name if code else 'error'}: {e.details() if hasattr(e, 'details') else e}"
        except OSError as e:
            self.connection["error"] = str(e)
        finally:
            with self._lock:
                self._call = None
            work.put(_STOP)
            worker.join(timeout=30)
            requests.put(_STOP)
            channel.close()
        return got

    def _work(self, work: queue.Queue, requests: queue.Queue) -> None:
        while True:
            item = work.get()
            batch = [item]
            while True:  # drain: keep only the newest response per type
                try:
                    batch.append(work.get_nowait())
                except queue.Empty:
                    break
            stop = any(b is _STOP for b in batch)
            latest = {}
            for b in batch:
                if b is not _STOP:
                    latest.pop(b.type_url, None)
                    latest[b.type_url] = b
            big = sum(r.ByteSize() for r in latest.values()) >= TRIM_AFTER_BYTES
            for resp in latest.values():
                try:
                    for req in self.state.handle(resp):
                        requests.put(req)
                except Exception:  # never let one bad push kill the stream
                    log.exception("internal error while handling an xDS response")
            resp = item = batch = latest = None  # drop the last response before trimming
            if big:
                memory.trim()
            if stop:
                return
