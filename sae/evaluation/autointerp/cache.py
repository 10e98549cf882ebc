"""Every LM answer kept on disk, keyed by (model, prompt): an interrupted autointerp run asks nothing twice.

The cache is a JSONL file, one {"key", "model", "prompt", "answer"} line appended and flushed per answer, so a run
killed mid-way loses at most the answer being written (a torn last line is skipped on reading).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sae.evaluation.autointerp.clients import LMClient


def answer_key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


class CachedClient:
    """`client` behind the answer cache at `path`; `asked` counts the prompts that went to the client."""

    def __init__(self, client: LMClient, path: str | Path):
        self.client, self.path, self.model = client, Path(path), client.model
        self.answers: dict[str, str] = {}
        self.asked = 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.answers[record["key"]] = record["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a crash mid-write: that prompt is asked again

    def complete(self, prompt: str) -> str:
        key = answer_key(self.model, prompt)
        if key not in self.answers:
            answer = self.client.complete(prompt)
            self.asked += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _ends_unfinished(self.path)
            with open(self.path, "a") as fh:
                if torn:  # end the line a crash left unfinished, so this answer gets a line of its own
                    fh.write("\n")
                fh.write(json.dumps({"key": key, "model": self.model, "prompt": prompt, "answer": answer}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.answers[key] = answer
        return self.answers[key]


def _ends_unfinished(path: Path) -> bool:
    """Whether the file's last line lacks its newline (a write cut short); reads one byte."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"
