"""Autointerp's explanations and scores (sae.evaluation.autointerp: contexts, prompts, pipeline) on synthetic
activations, through a scripted OpenAI-compatible server started by the test (scripted answers: an explainer that
names the most often highlighted word and a scorer that says yes when that word is in the text), so the expected
scores are known: F1 1 for each latent's own explanation, lower for the random-explanation floor."""

from __future__ import annotations

import html
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from sae.__main__ import main
from sae.errors import ConfigError
from sae.evaluation.autointerp.cache import CachedClient
from sae.evaluation.autointerp.clients import HttpClient
from sae.evaluation.autointerp.contexts import Window, latent_contexts, sample_latents
from sae.evaluation.autointerp.pipeline import distribution, floor_donors, run_autointerp
from sae.evaluation.autointerp.prompts import explain_prompt, highlighted, plain, read_explanation, score_prompt

# contexts, prompts and the floor, on synthetic activations: latent m fires on the word WORDS[m]

WORDS = ["chest", "pain", "fever", "cough", "femur", "fracture", "diabetes", "arm", "left", "acute"]


def synthetic(rows: int = 40, length: int = 12, latents: int = 4, seed: int = 0):
    """(acts per row [T, M], texts per row): latent m is 1 + (position / T) on " WORDS[m]", 0 elsewhere."""
    rng = random.Random(seed)
    texts, acts = [], []
    for _ in range(rows):
        words = rng.choices(WORDS, k=length)
        texts.append([" " + w for w in words])
        a = torch.zeros(length, latents)
        for p, w in enumerate(words):
            if WORDS.index(w) < latents:
                a[p, WORDS.index(w)] = 1 + p / length
        acts.append(a)
    return acts, texts


def test_contexts_are_balanced_disjoint_real_and_deterministic():
    acts, texts = synthetic()
    contexts = latent_contexts(acts, texts, [0, 1, 2, 3], n_top=4, n_quantile=3, n_score=6, context=2, seed=7)
    assert contexts == latent_contexts(acts, texts, [0, 1, 2, 3], n_top=4, n_quantile=3, n_score=6, context=2, seed=7)
    assert contexts != latent_contexts(acts, texts, [0, 1, 2, 3], n_top=4, n_quantile=3, n_score=6, context=2, seed=8)
    for m, c in enumerate(contexts):
        assert c.fire_count == sum(int(a[:, m].gt(0).sum()) for a in acts)
        assert len(c.explain) == 4 + 3
        peaks = [max(w.activations) for w in c.explain]
        assert peaks[:4] == sorted(peaks[:4], reverse=True) and peaks[4:] == sorted(peaks[4:])
        assert min(peaks[:4]) >= max(peaks[4:])  # the top windows hold the strongest rows
        truth = [t for _, t in c.held_out]
        assert truth.count(True) == truth.count(False) == 6
        rows = [w.row for w in c.explain] + [w.row for w, _ in c.held_out]
        assert len(rows) == len(set(rows))  # no row serves twice
        for w, active in c.held_out:
            assert len(w.tokens) == len(w.activations) <= 5
            assert (acts[w.row][w.position, m] > 0) if active else not any(w.activations)
            assert (" " + WORDS[m] in w.tokens) is active


def test_contexts_without_quiet_rows_have_no_held_out_set():
    acts = [torch.ones(6, 1) for _ in range(8)]  # fires everywhere: no non-activating window exists
    (c,) = latent_contexts(acts, [["x"] * 6] * 8, [5], n_top=3, n_quantile=2, n_score=4, context=1)
    assert c.held_out == [] and len(c.explain) == 3 + 2 and c.latent == 5


def test_highlighting_and_explanations():
    w = Window([" acute", " chest", " pain", "\n", "x"], [0.0, 1.0, 2.0, 0.0, 3.0], 0, 2)
    assert highlighted(w) == "acute <<chest pain>> <<x>>"
    assert plain(w) == "acute chest pain x"
    assert read_explanation('\n  Explanation: "mentions of chest pain"\nmore') == "mentions of chest pain"
    assert read_explanation('- **Description:** The feature detects "fever"') == "fever"
    assert read_explanation("   \n") == ""
    assert len(read_explanation("a" * 1000)) == 200


@pytest.mark.parametrize("n", [2, 3, 7])
def test_floor_donors_never_give_a_latent_its_own_explanation(n):
    latents = list(range(10, 10 + n))
    donors = floor_donors(latents, seed=3)
    assert donors == floor_donors(latents, seed=3)
    assert sorted(donors) == sorted(donors.values()) == latents
    assert all(a != b for a, b in donors.items())
    assert floor_donors([4]) == {}


def test_sample_latents_draws_from_firing_latents_and_refuses_too_many():
    counts = torch.tensor([0, 3, 0, 5, 1])
    assert sample_latents(counts, 2, seed=0) == sample_latents(counts, 2, seed=0)
    assert set(sample_latents(counts, 2)) <= {1, 3, 4}
    assert sample_latents(counts, 5) == [1, 3, 4]  # all that fire
    with pytest.raises(ConfigError, match="--autointerp-latents 6: the SAE has 5 latents; ask for 1 to 5"):
        sample_latents(counts, 6)
    with pytest.raises(ConfigError, match="has 5 latents"):
        sample_latents(counts, 0)


def test_distribution_quantiles_by_hand():
    d = distribution([0.0, 1.0, 0.5, 0.25])  # sorted 0, .25, .5, 1
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.4375) and d["median"] == pytest.approx(0.375)
    assert d["quantiles"]["0.25"] == pytest.approx(0.1875) and d["quantiles"]["0.9"] == pytest.approx(0.85)
    assert distribution([])["mean"] is None


# a scripted OpenAI-compatible server, started by the test


def word_explainer(prompt: str) -> str:
    """Scripted LM: explains with the most often highlighted word; scores yes iff that word is in the text."""
    if prompt.startswith("We are studying"):
        marked = re.findall(r"<<(\w+)>>", prompt)
        return f"Explanation: the word {max(sorted(set(marked)), key=marked.count)}"
    word = re.search(r"described as: the word (\w+)", prompt).group(1)
    text = re.search(r"Text: (.*)\n\n", prompt).group(1)
    return "Yes." if word in text.split() else "no"


class ScriptedServer:
    """An OpenAI-compatible /v1/chat/completions on localhost, in a thread; `script(prompt, n)` (n: this
    request's number, from 0) returns the answer text, or a dict with "delay" (seconds to sleep first),
    "answer", "status" (an HTTP error code) or "body" (raw bytes to send)."""

    def __init__(self, script) -> None:
        self.script, self.prompts = script, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["temperature"] == 0.0
                prompt = body["messages"][-1]["content"]
                n = len(server.prompts)
                server.prompts.append(prompt)
                reply = server.script(prompt, n)
                reply = reply if isinstance(reply, dict) else {"answer": reply}
                time.sleep(reply.get("delay", 0))
                if "status" in reply:
                    self.send_error(reply["status"], "scripted failure")
                    return
                data = (
                    reply.get("body")
                    or json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": reply["answer"]}}]}
                    ).encode()
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *args: None  # a client that timed out closed the socket: expected
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def client(url: str) -> HttpClient:
    return HttpClient(url, "scripted-model", timeout_s=5.0, retries=1, backoff_s=0.0)


def test_pipeline_over_http_scores_explanations_above_the_floor_and_resumes_from_the_cache(tmp_path):
    acts, texts = synthetic()
    contexts = latent_contexts(acts, texts, [0, 1, 2, 3], n_top=4, n_quantile=2, n_score=6, context=2)
    with ScriptedServer(lambda prompt, n: word_explainer(prompt)) as server:
        cached = CachedClient(client(server.url), tmp_path / "answers.jsonl")
        result = run_autointerp(contexts, cached, seed=0, progress=False)
        asked = len(server.prompts)
        # 4 explanations; 12 held-out contexts per latent, scored with its explanation and the floor's. A prompt
        # asked twice (the same explanation on the same text) is answered from the cache the second time.
        assert asked == cached.asked == len(set(server.prompts)) == len(set(prompts_of(contexts, result)))
        for record in result["latents"]:
            assert record["explanation"] == f"the word {WORDS[record['latent']]}"
            assert record["detection"]["f1"] == 1.0 and record["detection"]["accuracy"] == 1.0
            assert record["floor_from"] != record["latent"] and record["floor"]["malformed"] == 0
        summary = result["summary"]
        assert summary["scored"] == 4 and summary["malformed_answers"] == 0
        assert summary["f1"]["mean"] == 1.0 and summary["floor_f1"]["mean"] < 0.6

        # Resume: a new run over the same cache file asks the server nothing.
        again = CachedClient(client(server.url), tmp_path / "answers.jsonl")
        assert run_autointerp(contexts, again, seed=0, progress=False) == result
        assert len(server.prompts) == asked and again.asked == 0


def test_malformed_answers_are_counted_and_scored_as_wrong(tmp_path):
    acts, texts = synthetic()
    contexts = latent_contexts(acts, texts, [0, 1], n_top=4, n_quantile=0, n_score=6, context=2)

    def script(prompt, n):  # rambles instead of answering on every context that mentions "femur"
        return "Hmm, hard to say." if "Text:" in prompt and " femur" in prompt else word_explainer(prompt)

    with ScriptedServer(script) as server:
        result = run_autointerp(contexts, client(server.url), progress=False)
    for record, c in zip(result["latents"], contexts):
        femur = [truth for w, truth in c.held_out if " femur" in w.tokens]
        d = record["detection"]
        assert d["malformed"] == len(femur) > 0 and d["n"] == len(c.held_out)
        assert d["accuracy"] == pytest.approx(1 - len(femur) / len(c.held_out))  # each malformed one wrong
        assert d["recall"] == pytest.approx(1 - femur.count(True) / (len(c.held_out) // 2))
        assert record["floor"]["malformed"] == len(femur)
    assert result["summary"]["malformed_answers"] == sum(r["detection"]["malformed"] for r in result["latents"])


def prompts_of(contexts, result) -> list[str]:
    """Every prompt a run asks: one explanation per latent, then each held-out text with its explanation and
    with the floor's."""
    by_latent = {r["latent"]: r for r in result["latents"]}
    explanation = {latent: r["explanation"] for latent, r in by_latent.items()}
    prompts = [explain_prompt(c.explain) for c in contexts]
    for c in contexts:
        for given in (explanation[c.latent], explanation[by_latent[c.latent]["floor_from"]]):
            prompts += [score_prompt(given, plain(w)) for w, _ in c.held_out]
    return prompts


def first_word_explainer(prompt: str) -> str:
    """Scripted LM for real token contexts: explains with the first highlighted word; yes iff it is in the text."""
    if prompt.startswith("We are studying"):
        marked = re.search(r"<<\s*(\w+)", prompt.split("Example 1:", 1)[1])  # not the instructions' <<like this>>
        return f"the word {marked.group(1) if marked else 'none'}"
    word = re.search(r"described as: the word (\w+)", prompt).group(1)
    return "yes" if word in re.search(r"Text: (.*)\n\n", prompt).group(1) else "no"


@pytest.fixture(scope="module")
def sparse_sae(tiny_model, text_file, tmp_path_factory):
    """params.npz of a random SAE on the tiny model's layer 2 (d_in 32, 24 latents), each latent's threshold at
    the 95th percentile of its pre-activation on the text, so that it fires in some rows and not in others."""
    from harvest import DataConfig, ModelConfig, load_lm
    from harvest.activations import keep_mask, layer_activations
    from harvest.text import TokenRows, load_texts
    from sae.evaluation.splice import pad_rows

    lm, tokenizer = load_lm(ModelConfig(model=tiny_model, layer=2, model_device="cpu"))
    rows = [r for r, _ in TokenRows(load_texts(DataConfig(dataset=text_file, context_size=16)), tokenizer, 16).take(40)]
    ids, mask = pad_rows(rows, tokenizer.pad_token_id)
    x = layer_activations(lm, 2, ids, mask)[keep_mask(ids, mask, tokenizer, True)].float()
    g = torch.Generator().manual_seed(3)
    W_enc = torch.randn(32, 24, generator=g) / 32**0.5
    weights = {
        "W_enc": W_enc,
        "b_enc": torch.zeros(24),
        "W_dec": torch.randn(24, 32, generator=g),
        "b_dec": torch.zeros(32),
        "threshold": (x @ W_enc).quantile(0.95, dim=0).clamp_min(1e-3),
    }
    path = tmp_path_factory.mktemp("sparse-sae") / "params.npz"
    np.savez(path, **{name: t.numpy() for name, t in weights.items()})
    return str(path)


def eval_args(npz: str, tiny_model: str, text_file: str, out, *extra: str) -> list[str]:
    return [
        "eval", npz, "--model", tiny_model, "--layer", "2", "--dataset", text_file, "--context-size", "16",
        "--heldout-examples", "40", "--eval-tokens", "200", "--splice-rows", "0", "--eval-device", "cpu",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_eval_autointerp_feeds_report_plot_and_browser_and_resumes(sparse_sae, tiny_model, text_file, tmp_path):
    out = tmp_path / "eval"
    with ScriptedServer(lambda prompt, n: first_word_explainer(prompt)) as server:
        flags = ["--autointerp-latents", "6", "--autointerp-endpoint", server.url, "--autointerp-model", "scripted"]
        assert main(eval_args(sparse_sae, tiny_model, text_file, out, *flags)) == 0
        asked = len(server.prompts)
        report = json.loads((out / "report.json").read_text())
        section = report["saes"][sparse_sae]["autointerp"]
        summary = section["summary"]
        assert summary["requested"] == 6 and len(summary["sampled"]) == len(section["latents"]) == 6
        assert summary["scored"] >= 1 and summary["f1"]["n"] == summary["scored"]
        # The scripted explainer names a word of the top context: better than another latent's word, on average.
        assert summary["f1"]["mean"] > summary["floor_f1"]["mean"]
        for record in section["latents"]:
            assert record["explanation"].startswith("the word ")
            if record["detection"]:
                assert record["detection"]["n"] == record["held_out_contexts"] > 0 and record["floor"] is not None
        md = (out / "report.md").read_text()
        assert "Autointerp" in md and f"{sparse_sae}: {summary['scored']} of 6 explained latents scored" in md
        assert (out / "autointerp_f1.png").read_bytes().startswith(b"\x89PNG")
        page = (out / "browser-0.html").read_text(encoding="utf-8")
        for record in section["latents"]:  # each explained latent has its section, with explanation and score
            assert f'id="latent-{record["latent"]}"' in page
            assert html.escape(f"explanation: {record['explanation']}") in page
        assert page.count('class="autointerp"') == 6 and "detection F1" in page
        assert len((out / "autointerp-answers.jsonl").read_text().splitlines()) == asked

        # The same command again: every answer comes from the cache, the server is asked nothing.
        assert main(eval_args(sparse_sae, tiny_model, text_file, out, *flags)) == 0
        assert len(server.prompts) == asked
        assert json.loads((out / "report.json").read_text())["saes"][sparse_sae]["autointerp"] == section


def test_eval_autointerp_refuses_more_latents_than_the_sae_has_and_a_dead_endpoint(
    sparse_sae, tiny_model, text_file, tmp_path, capsys, monkeypatch
):
    import sae.evaluation.report as report

    def no_model_work(*args, **kwargs):
        raise AssertionError("the language model was loaded before the request was refused")

    monkeypatch.setattr(report, "load_lm", no_model_work)
    flags = ["--autointerp-endpoint", "http://127.0.0.1:9", "--autointerp-model", "m"]
    assert main(eval_args(sparse_sae, tiny_model, text_file, tmp_path, "--autointerp-latents", "25", *flags)) == 2
    assert "--autointerp-latents 25: " in (err := capsys.readouterr().err) and "has only 24 latents" in err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [
        "--autointerp-endpoint",
        f"http://127.0.0.1:{port}",
        "--autointerp-model",
        "m",
        "--autointerp-timeout-s",
        "1",
        "--autointerp-retries",
        "0",
    ]
    assert main(eval_args(sparse_sae, tiny_model, text_file, tmp_path, "--autointerp-latents", "2", *flags)) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the LM endpoint at http://127.0.0.1:{port}/v1/models" in err and "server is running" in err
    no_model = ["--autointerp-latents", "2", "--autointerp-endpoint", f"http://127.0.0.1:{port}"]
    assert main(eval_args(sparse_sae, tiny_model, text_file, tmp_path, *no_model)) == 2
    assert "--autointerp-endpoint needs --autointerp-model" in capsys.readouterr().err


@pytest.mark.slow
def test_the_offline_gemma_served_over_http_explains_and_scores_through_the_pipeline(tmp_path):
    """The HTTP path against a real model: a local OpenAI-compatible server started here answers with the offline
    Gemma-3 270M through transformers (the local default client), sized for CI (2 latents, 10 prompts, ~40 s on
    2 cores). Its scores are weak: this checks the pipeline end to end, not them."""
    from sae.evaluation.autointerp.clients import TransformersClient

    acts, texts = synthetic()
    contexts = latent_contexts(acts, texts, [0, 1], n_top=4, n_quantile=1, n_score=1, context=3)
    start = time.perf_counter()
    local = TransformersClient(max_new_tokens=16)
    with ScriptedServer(lambda prompt, n: local.complete(prompt)) as server:
        loaded = time.perf_counter()
        cached = CachedClient(HttpClient(server.url, "offline-default", timeout_s=120.0), tmp_path / "answers.jsonl")
        result = run_autointerp(contexts, cached, progress=False)
        print(f"\nload {loaded - start:.1f} s, {cached.asked} prompts in {time.perf_counter() - loaded:.1f} s")
        print(json.dumps({r["latent"]: [r["explanation"], r["detection"], r["floor"]] for r in result["latents"]}))
        assert cached.asked == len(server.prompts) == len(set(prompts_of(contexts, result)))
        assert result["summary"]["scored"] == 2
        for record in result["latents"]:
            d = record["detection"]
            assert record["explanation"] and d["n"] == 2 and 0 <= d["malformed"] <= 2 and 0 <= d["f1"] <= 1
        again = CachedClient(HttpClient(server.url, "offline-default"), tmp_path / "answers.jsonl")
        assert run_autointerp(contexts, again, progress=False) == result and again.asked == 0
        assert len(server.prompts) == cached.asked
