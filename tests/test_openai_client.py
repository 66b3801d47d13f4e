#!/usr/bin/env python3
"""The official `openai` Python client against `nibble serve` (the client
lives in the repo's .venv; `make test` installs it there)."""
import os
import signal
import socket
import subprocess
import sys
import time

from tally import check, done

try:
    import openai
except ImportError:
    venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "python")
    if os.path.exists(venv) and not os.environ.get("NIBBLE_TEST_REEXEC"):
        os.environ["NIBBLE_TEST_REEXEC"] = "1"
        os.execv(venv, [venv] + sys.argv)
    print("test_openai_client: 0 passed, 1 failed (the openai package is not installed; run make test)")
    sys.exit(1)



with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
srv = subprocess.Popen([os.environ.get("NIBBLE", "bin/nibble"), "serve", "--model", "tests/fixtures/models/qwen2",
                        "--port", str(port), "--served-model-name", "qwen2", "--api-key", "k"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
try:
    for _ in range(100):
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.1)
    models = client.models.list()
    check("models.list", [m.id for m in models.data] == ["qwen2"], str(models))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(model="qwen2", messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    check("chat.completions.create", r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 12
          and r.choices[0].finish_reason == "length", str(r))
    chunks = list(client.chat.completions.create(model="qwen2", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check("chat streaming equals the non-streamed text, with usage", streamed == text and chunks[-1].usage is not None
          and chunks[-1].usage.completion_tokens == 12, f"{streamed!r} vs {text!r}")
    c = client.completions.create(model="qwen2", prompt="Once upon a time", max_tokens=8, temperature=0, seed=1)
    check("completions.create", c.choices[0].text and c.usage.completion_tokens == 8, str(c))
    cs = list(client.completions.create(model="qwen2", prompt="Once upon a time", max_tokens=8, temperature=0,
                                        stream=True))
    check("completions streaming", "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text)
    try:
        client.chat.completions.create(model="qwen2", messages=msgs, temperature=7)
        check("bad temperature raises BadRequestError", False, "no error")
    except openai.BadRequestError as e:
        check("bad temperature raises BadRequestError", "temperature" in str(e), str(e))
    try:
        client.chat.completions.create(model="gpt-4", messages=msgs)
        check("unknown model is an error", False, "no error")
    except openai.BadRequestError as e:
        check("unknown model is an error", "gpt-4" in str(e), str(e))
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        check("wrong API key raises AuthenticationError", False, "no error")
    except openai.AuthenticationError:
        check("wrong API key raises AuthenticationError", True)
finally:
    srv.send_signal(signal.SIGTERM)
    rc = srv.wait(timeout=30)
    check("server exits 0 on SIGTERM", rc == 0, f"rc={rc}")

done("test_openai_client")
