"""``rollout.engine: vllm_server``: vLLM in another Python environment, over HTTP.

vllm-ascend pins its own torch and torch-npu, so on Ascend vLLM may have to
live in an environment of its own. There ``npu-rft rollout-server`` (npu-rft
installed beside vLLM) serves a :class:`~npu_rft.engines.vllm.VllmEngine`
on a small JSON protocol, and the trainer's :class:`VllmServerEngine` calls it:

    GET  /health                       {"ok": true, "model": ...}
    POST /generate      {prompt_ids, max_new_tokens, num_samples, temperature, top_p, seed, eos_token_ids}
                        -> {prompt_index, completion_ids, truncated, logprobs}
    POST /load_weights  {path}         a safetensors file of checkpoint-named weights, LoRA merged,
                        -> {"ok": true, "tensors": n}          on storage both machines see

Every request has an explicit time-out (``rollout.vllm.timeout``) and is
retried ``rollout.vllm.retries`` times when the server does not answer
(connection refused or reset, time-out), one second apart, then doubling; a
server that stays silent stops the run with an :class:`EngineError` naming
its URL. An error the server reports (HTTP 4xx/5xx) is not retried.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from npu_rft.engines.base import EngineError, VllmConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "policy.safetensors"


# ----------------------------------------------------------------------------- the trainer's side


class VllmServerEngine:
    """The engine protocol over HTTP (see the module docstring); no sleep/wake."""

    returns_logprobs = True

    def __init__(self, url: str, config: VllmConfig, eos_token_ids: Sequence[int]) -> None:
        self.url = url.rstrip("/")
        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        self.weights_dir = Path(config.weights_dir or tempfile.mkdtemp(prefix="npu-rft-weights-"))
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        info = self._request("GET", "/health")
        logger.info("rollout: vllm_server at %s serves %s", self.url, info.get("model"))

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any, seed: int) -> Any:
        from npu_rft.rollout import Samples

        answer = self._request("POST", "/generate", {
            "prompt_ids": [list(map(int, p)) for p in prompt_ids], "max_new_tokens": params.max_new_tokens,
            "num_samples": params.num_samples, "temperature": params.temperature, "top_p": params.top_p,
            "seed": int(seed), "eos_token_ids": self.eos_token_ids,
        })
        return Samples(answer["prompt_index"], answer["completion_ids"], answer["truncated"], answer["logprobs"])

    def sync_weights(self, model: Any) -> None:
        """Write the policy's weights (LoRA merged) to ``rollout.vllm.weights_dir`` and have the server load them."""
        import torch
        from safetensors.torch import save_file

        from npu_rft.engines.weights import engine_weights

        with torch.no_grad():
            tensors = {name: tensor.contiguous().cpu() for name, tensor in engine_weights(model)}
        path = self.weights_dir / WEIGHTS_FILE
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)  # the server never reads a half-written file
        self._request("POST", "/load_weights", {"path": str(path.resolve())})

    def _request(self, method: str, route: str, payload: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        tries, wait = 1 + self.config.retries, 1.0
        for attempt in range(1, tries + 1):
            request = urllib.request.Request(self.url + route, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:  # the server answered with an error: not retried
                detail = exc.read().decode(errors="replace")
                try:
                    detail = json.loads(detail)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                raise EngineError(f"rollout.engine vllm_server: {self.url}{route} answered {exc.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt == tries:
                    raise EngineError(
                        f"rollout.engine vllm_server: no answer from {self.url}{route} after {tries} tries "
                        f"({reason}; time-out {self.config.timeout:g} s each); start `npu-rft rollout-server` "
                        "there, or fix rollout.vllm.url") from None
                logger.warning("rollout: %s%s did not answer (%s); retry %d of %d in %g s", self.url, route, reason,
                               attempt, tries - 1, wait)
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- the server


def make_handler(engine: Any, model: str) -> type:
    """The request handler of one server: routes to ``engine`` (a ``VllmEngine``, or a stand-in in tests)."""

    routes: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
        "/generate": lambda body: _generate(engine, body),
        "/load_weights": lambda body: _load_weights(engine, body),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"ok": True, "model": model})
            else:
                self._answer(404, {"error": f"no route GET {self.path}; GET /health"})

        def do_POST(self) -> None:
            route = routes.get(self.path)
            if route is None:
                self._answer(404, {"error": f"no route POST {self.path}; POST one of {sorted(routes)}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self._answer(200, route(body))
            except (KeyError, TypeError, ValueError) as exc:
                self._answer(400, {"error": f"bad request to {self.path}: {exc!r}"})
            except Exception as exc:  # noqa: BLE001 - reported to the trainer, which stops with it
                logger.exception("rollout-server: %s failed", self.path)
                self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})

        def _answer(self, status: int, payload: Dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            logger.debug("rollout-server: " + format, *args)

    return Handler


def _generate(engine: Any, body: Dict[str, Any]) -> Dict[str, Any]:
    from npu_rft.rollout import SamplingParams

    params = SamplingParams(max_new_tokens=int(body["max_new_tokens"]), num_samples=int(body["num_samples"]),
                            temperature=float(body["temperature"]), top_p=float(body["top_p"]))
    engine.eos_token_ids = [int(i) for i in body["eos_token_ids"]]
    samples = engine.generate(body["prompt_ids"], params, int(body["seed"]))
    return {"prompt_index": samples.prompt_index, "completion_ids": samples.completion_ids,
            "truncated": samples.truncated, "logprobs": samples.logprobs}


def _load_weights(engine: Any, body: Dict[str, Any]) -> Dict[str, Any]:
    from safetensors import safe_open

    path = str(body["path"])
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path} does not exist here; rollout.vllm.weights_dir must be storage "
                         "that the trainer and the server both see")
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
        engine.load_weights((name, f.get_tensor(name)) for name in names)
    return {"ok": True, "tensors": len(names)}


def serve(model: str, *, host: str, port: int, dtype: str, config: VllmConfig) -> None:
    """Serve a vLLM engine on ``model`` until the process is stopped (``npu-rft rollout-server``)."""
    from npu_rft.engines.vllm import VllmEngine

    engine = VllmEngine(model, dtype, [], config)
    server = HTTPServer((host, port), make_handler(engine, model))
    logger.info("rollout-server: serving %s (%s) on http://%s:%d", model, dtype, host, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
