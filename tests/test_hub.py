"""The hub check: decided fast and once, asked only for hub ids, failing a missing hub model at once."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, tiny_tokenizer

from decoding import hub
from decoding.errors import FusemtError
from decoding.model import ModelSpec, load_model


def closed_port_url() -> str:
    """A local port nobody listens on: connection refused at once, as on a machine without network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def endpoint(monkeypatch):
    """Point huggingface_hub at a given endpoint, with offline mode off and no probe remembered."""
    from huggingface_hub import constants

    def use(url: str) -> str:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        return url

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    hub._probe.cache_clear()
    return use


def test_offline_mode_decides_without_any_request(endpoint, monkeypatch):
    endpoint(closed_port_url())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("offline mode must not probe the hub"))
    assert hub.unavailable_reason() == "HF_HUB_OFFLINE=1 is set"


def test_unreachable_hub_is_decided_fast_and_once(endpoint):
    url = endpoint(closed_port_url())
    start = time.perf_counter()
    reason = hub.unavailable_reason()
    assert time.perf_counter() - start < 1.0
    assert reason.startswith(f"the hub ({url}) is unreachable (ConnectError")
    assert hub.unavailable_reason() == reason and hub._probe.cache_info().hits == 1


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_any_http_answer_means_reachable(endpoint):
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint(f"http://127.0.0.1:{server.server_port}")
        assert hub.unavailable_reason() is None
    finally:
        server.shutdown()


def test_a_hub_that_never_answers_costs_only_the_timeout(endpoint):
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = endpoint(f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        reason = hub.unavailable_reason()
        elapsed = time.perf_counter() - start
    assert reason.startswith(f"the hub ({url}) ")
    assert hub.PROBE_TIMEOUT_S - 0.05 < elapsed < hub.PROBE_TIMEOUT_S + 0.5


def test_unreachable_hub_model_fails_at_once_with_the_fix(endpoint, tmp_path):
    endpoint(closed_port_url())
    start = time.perf_counter()
    with pytest.raises(FusemtError) as err:
        load_model(ModelSpec(path="org/does-not-exist"))
    assert time.perf_counter() - start < 3.0
    message = str(err.value)
    assert "\n" not in message and "'org/does-not-exist' is not a local directory nor in the HF cache" in message
    assert "offline: use a local directory or an embedded model" in message


def test_a_missing_path_that_is_no_hub_id_says_so_without_asking_the_hub(monkeypatch):
    monkeypatch.setattr(hub, "unavailable_reason", lambda: pytest.fail("no hub id, no hub check"))
    with pytest.raises(FusemtError, match="'runs/a/final' is neither a local directory nor a hub id"):
        load_model(ModelSpec(path="runs/a/final"))


def _save_tiny_model(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_directory_never_asks_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "unavailable_reason", lambda: pytest.fail("a local directory must not check the hub"))
    loaded = load_model(ModelSpec(name="tiny-local", path=str(_save_tiny_model(tmp_path / "tiny"))))
    assert loaded.vocab_size == len(tiny_tokenizer())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma3_270m", "smollm2_135m"])
def test_the_embedded_models_never_ask_the_hub(monkeypatch, model):
    import torch
    from conftest import compose_run

    from decoding.model import _load_pretrained

    monkeypatch.setattr(hub, "unavailable_reason", lambda: pytest.fail("an embedded model must not check the hub"))
    tokenizer, _ = _load_pretrained(compose_run(f"models={model}").models[0], torch.device("cpu"), torch.float32)
    assert tokenizer.eos_token


def _translate_cli(tmp_path, env, *overrides):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runners.translate", f"paths.results_dir={tmp_path}/results",
                           f"paths.output_dir={tmp_path}/outputs", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


def _offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": closed_port_url()}


def test_cli_with_an_unreachable_hub_id_exits_2_in_seconds(tmp_path):
    proc, elapsed = _translate_cli(tmp_path, _offline_env(tmp_path), "models.members=[org/does-not-exist]",
                                   "logger=none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusemt: error:")]
    assert len(errors) == 1 and "offline: use a local directory or an embedded model" in errors[0]
    assert "Traceback" not in proc.stderr and "Retry" not in proc.stderr
    assert elapsed < 20  # was ~51 s of retries (start-up with torch and Hydra is most of what is left)


def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_is_unreachable(tmp_path):
    """The HF cache layout (refs/main -> snapshots/<commit>/): a model downloaded earlier still loads
    offline, at once, without retrying the hub."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    _save_tiny_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = ("import time; from decoding.model import ModelSpec, load_model; t = time.perf_counter(); "
              "m = load_model(ModelSpec(path='org/tiny')); print(m.vocab_size, round(time.perf_counter() - t, 2))")
    proc = subprocess.run([sys.executable, "-c", script], env=_offline_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vocab_size, seconds = proc.stdout.split()
    assert int(vocab_size) == len(tiny_tokenizer()) and float(seconds) < 5
    assert "Retry" not in proc.stderr
