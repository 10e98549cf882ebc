"""The LMs autointerp asks: anything with `complete(prompt) -> str`.

HttpClient speaks the OpenAI chat-completions protocol that vLLM, llama.cpp's server and Ollama serve
(POST {base_url}/v1/chat/completions), with a timeout per request and retries with exponential backoff; an
endpoint that cannot be reached or keeps failing raises `EndpointError` naming the URL and what to check.
TransformersClient runs a local causal LM (the offline default: the embedded Gemma-3 270M).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Protocol


class EndpointError(RuntimeError):
    """The LM endpoint could not answer (unreachable, timing out, or replying with an error or garbage)."""


class LMClient(Protocol):
    model: str

    def complete(self, prompt: str) -> str: ...


class HttpClient:
    """An OpenAI-compatible chat-completions endpoint, e.g. http://localhost:8000 (vLLM) or :11434 (Ollama)."""

    def __init__(
        self, base_url: str, model: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0,
        max_tokens: int = 64, api_key: str | None = None,
    ):  # fmt: skip
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model, self.timeout_s, self.retries, self.backoff_s = model, timeout_s, retries, backoff_s
        self.max_tokens, self.api_key = max_tokens, api_key
        self.requests = 0  # sent, retries included

    def check(self) -> list[str] | None:
        """Before any work: is a server listening at the address? GET /v1/models (vLLM, llama.cpp's server and
        Ollama serve it). A connection that fails raises EndpointError; any HTTP reply counts as reachable (a
        server without the listing is not refused). Returns the served model ids when the server lists them."""
        url = self.url.removesuffix("/chat/completions") + "/models"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout_s) as r:
                listing = json.loads(r.read())
            return [str(m["id"]) for m in listing["data"]]
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise EndpointError(
                f"cannot reach the LM endpoint at {url} ({type(e).__name__}: {e}); check that the server is running "
                "at that address (vLLM: vllm serve MODEL --port 8000; Ollama: ollama serve, port 11434)"
            ) from e
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return None

    def complete(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.requests += 1
            request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())
                return str(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = e
                if 400 <= e.code < 500 and e.code != 429:  # the request is wrong: asking again will not help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                last = ValueError(f"the reply is not a chat completion ({type(e).__name__}: {e})")
        raise EndpointError(
            f"the LM endpoint {self.url} did not answer after {self.retries + 1} attempt(s) "
            f"({type(last).__name__}: {last}); check that the server is running and serves model {self.model!r} "
            f"at that address, or raise --autointerp-timeout-s (now {self.timeout_s:g} s)"
        ) from last


class TransformersClient:
    """A local causal LM through transformers, greedy decoding. A tokenizer with a chat template (an instruction-
    tuned model) gets the prompt as one user turn in it; a base model without one (the offline default) continues
    the prompt as written, which is why the prompts end with a cue (Description:, Answer:)."""

    def __init__(self, model_name: str = "offline-default", max_new_tokens: int = 32, device: str = "cpu"):
        from harvest.config import ModelConfig
        from harvest.lm import load_lm

        self.model = model_name
        # layer 0: any model has it (the client generates; it captures no layer)
        self.lm, self.tokenizer = load_lm(ModelConfig(model=model_name, layer=0, model_device=device))
        self.max_new_tokens = max_new_tokens

    def complete(self, prompt: str) -> str:
        import torch

        device = next(self.lm.parameters()).device
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = self.lm.generate(
                **ids, max_new_tokens=self.max_new_tokens, do_sample=False, stopping_criteria=[self._first_line(ids)]
            )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def _first_line(self, ids):
        """Stops generating once the answer has a line with text (all either prompt asks for), rather than
        running to max_new_tokens; leading blank lines do not count."""
        start, decode = ids["input_ids"].shape[1], self.tokenizer.decode

        def done(input_ids, scores, **kwargs) -> bool:
            text = decode(input_ids[0, start:], skip_special_tokens=True).lstrip()
            return bool(text) and "\n" in text

        return done
