"""Autointerp's LM plumbing and scoring: detection metrics on scripted answers, and the HTTP client against a
real local OpenAI-compatible server started here (a scripted-answer server: the offline Gemma would make the
tests minutes long), with a slow reply, malformed replies, an unreachable endpoint, and resume from the cache."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sae.evaluation.autointerp.cache import CachedClient
from sae.evaluation.autointerp.clients import EndpointError, HttpClient
from sae.evaluation.autointerp.score import detection_scores, parse_answer


def test_detection_scores_on_scripted_answers_match_the_hand_count():
    truth = [True, True, True, False, False, False]
    answers = ["Yes", "yes, it does", "maybe?", "No.", "YES", "no"]  # one malformed (scored wrong), one false yes
    d = detection_scores(answers, truth)
    # predicted: T, T, F (malformed on a positive), F, T, F -> tp 2, fp 1, fn 1, correct 4 of 6
    assert (d.accuracy, d.precision, d.recall) == (4 / 6, 2 / 3, 2 / 3)
    assert d.f1 == pytest.approx(2 / 3) and d.malformed == 1 and d.n == 6
    assert [parse_answer(a) for a in ("  yes", "No", "1", "it depends")] == [True, False, True, None]
    with pytest.raises(ValueError, match="2 answers for 3 contexts"):
        detection_scores(["yes", "no"], [True, False, True])


class Server:
    """A scripted OpenAI-compatible chat-completions server on a free local port, counting requests."""

    def __init__(self, replies, models=None):
        self.replies, self.requests, self.prompts, self.models = list(replies), 0, [], models
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- /v1/models, when the server lists its models
                if outer.models is None or self.path != "/v1/models":
                    self.send_error(404)
                    return
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]})
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def do_POST(self):  # noqa: N802 -- http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                outer.prompts.append(body["messages"][0]["content"])
                reply = outer.replies.pop(0) if outer.replies else "yes"
                if isinstance(reply, float):  # sleep past the client's timeout, then answer
                    time.sleep(reply)
                    reply = "yes"
                data = reply.encode() if reply.startswith("RAW:") else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()  # fmt: skip
                data = data.removeprefix(b"RAW:")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(replies, models=None):
        servers.append(Server(replies, models))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_http_client_answers_retries_a_timeout_and_refuses_garbage(server):
    s = server(["yes", 1.0, "no", "RAW:not json", 1.0, 1.0])
    client = HttpClient(s.url, "scripted", timeout_s=0.3, retries=1, backoff_s=0.01)
    assert client.complete("does it fire on <<heart>>?") == "yes"
    assert client.complete("second") == "no"  # the first try timed out after 0.3 s; the retry got "no"
    assert client.requests == 3 and s.requests == 3
    once = HttpClient(s.url, "scripted", timeout_s=0.3, retries=0)
    with pytest.raises(EndpointError, match="not a chat completion"):
        once.complete("third")
    with pytest.raises(EndpointError, match="after 2 attempt.*TimeoutError.*--autointerp-timeout-s"):
        client.complete("fourth")  # both tries time out


def test_an_unreachable_endpoint_is_named_with_what_to_check():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = HttpClient(f"http://127.0.0.1:{port}", "m", timeout_s=1, retries=1, backoff_s=0.01)
    with pytest.raises(
        EndpointError, match=f"127.0.0.1:{port}/v1/chat/completions did not answer .* server is running"
    ):
        client.complete("hello")
    with pytest.raises(EndpointError, match=f"cannot reach the LM endpoint at http://127.0.0.1:{port}/v1/models"):
        client.check()  # what python -m sae eval asks before any model work


def test_the_endpoint_check_reads_the_served_models_and_warns_of_a_name_not_among_them(server, tmp_path):
    from sae.evaluation.autointerp.pipeline import eval_client

    listing, bare = server([], models=["llama3.2:latest"]), server([])
    assert HttpClient(listing.url, "m").check() == ["llama3.2:latest"]
    assert HttpClient(bare.url, "m").check() is None  # no listing (404): reachable, not refused
    with pytest.warns(UserWarning, match="lists the models \\['llama3.2:latest'\\], not 'llama3.2'"):
        eval_client(listing.url, "llama3.2", 5.0, "cpu", tmp_path / "answers.jsonl")
    assert listing.requests == bare.requests == 0  # the check asks no question


def test_an_interrupted_run_resumes_from_the_answer_cache_without_asking_twice(server, tmp_path):
    first = server(["yes", "no", "maybe"])
    prompts = ["context A", "context B", "context C"]
    cached = CachedClient(HttpClient(first.url, "scripted", retries=0), tmp_path / "answers.jsonl")
    answers = [cached.complete(p) for p in prompts[:2]]  # interrupted after two prompts
    with open(tmp_path / "answers.jsonl", "a") as fh:
        fh.write('{"key": "torn')  # a crash mid-write leaves a torn line
    second = server(["maybe"])
    resumed = CachedClient(HttpClient(second.url, "scripted", retries=0), tmp_path / "answers.jsonl")
    answers = [resumed.complete(p) for p in prompts]
    assert answers == ["yes", "no", "maybe"] and resumed.asked == 1 and second.prompts == ["context C"]
    again = CachedClient(HttpClient(second.url, "scripted", retries=0), tmp_path / "answers.jsonl")
    assert [again.complete(p) for p in prompts] == answers and again.asked == 0 and second.requests == 1
    d = detection_scores(answers, [True, False, True])
    assert d.malformed == 1 and d.accuracy == 2 / 3  # "maybe" on an activating context: scored wrong


def test_transformers_client_continues_a_prompt_or_fills_the_chat_template(tiny_model):
    """Greedy decoding is deterministic: the answer is the same text each time. Without a chat template the model
    is given the prompt as written; with one, the prompt wrapped in it (what an instruction-tuned model expects)."""
    from sae.evaluation.autointerp.clients import TransformersClient

    client = TransformersClient(tiny_model, max_new_tokens=4)
    seen = []
    generate = client.lm.generate
    client.lm.generate = lambda **kw: seen.append(kw["input_ids"][0].tolist()) or generate(**kw)
    ids = lambda text, **kw: client.tokenizer(text, **kw)["input_ids"]  # noqa: E731
    plain = client.complete("fever cough")
    assert isinstance(plain, str) and plain == client.complete("fever cough")
    assert seen[0] == ids("fever cough")
    client.tokenizer.chat_template = "{% for m in messages %}<bos>{{ m['content'] }} and{% endfor %}"
    client.complete("fever cough")
    assert seen[-1] == ids("<bos>fever cough and", add_special_tokens=False) != seen[0]
