"""How far lean's token estimate (`lean.dialects.estimate`) is from real tokenizers.

    .venv/bin/pip install -e '.[bench]'   # bpe-openai: o200k_base, cl100k_base in its wheel
    .venv/bin/python -m bench.estimate_tokens

For each fixture: the real count by o200k_base (GPT-4o and later) and cl100k_base (GPT-4,
and close to many open models' tokenizers), the estimate, and the error (estimate / real
- 1; positive means lean counts too much). Fixtures: lean's own docs (Markdown), its
code (Python), its web page (JavaScript), news sentences in eight languages
(bench/fixtures/multilingual.json), and chat bodies made from them. For a whole body the
"real" count is the texts' tokens plus OpenAI's documented framing (3 tokens per message,
3 to prime the answer). Claude's and Gemini's tokenizers are not available offline: not
measured. bpe-openai is a bench tool only, never a dependency of lean.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

from lean.dialects.estimate import estimate_tokens, text_tokens

ROOT = Path(__file__).resolve().parent.parent


def fixtures() -> dict[str, str]:
    texts: dict[str, str] = {}
    for kind, pattern in (
        ("markdown", "docs/*.md"),
        ("python", "lean/**/*.py"),
        ("javascript", "lean/web/*.js"),
    ):
        files = sorted(glob.glob(str(ROOT / pattern), recursive=True))
        texts[kind] = "\n".join(Path(f).read_text() for f in files)
    with open(ROOT / "bench/fixtures/multilingual.json") as f:
        for lang, text in json.load(f).items():
            texts[f"prose-{lang}"] = text
    return texts


def bodies(texts: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Conversations of a few turns made of the fixtures' paragraphs."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("markdown", "python", "prose-en", "prose-zh", "prose-ru"):
        chunks = [c for c in texts[name].split("\n\n") if c.strip()][:40]
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for i, chunk in enumerate(chunks or [texts[name]]):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": chunk})
        out[f"chat-{name}"] = {"model": "m", "messages": messages}
    return out


def main() -> None:
    import bpe_openai  # type: ignore[import-not-found]

    encodings = {n: bpe_openai.get_encoding(n) for n in ("o200k_base", "cl100k_base")}
    texts = fixtures()
    print(f"{'fixture':18} {'chars':>8} {'estimate':>9} " + " ".join(f"{n:>22}" for n in encodings))
    errors: dict[str, list[float]] = {n: [] for n in encodings}
    for name, text in texts.items():
        estimate = math.ceil(text_tokens(text))
        cells = []
        for n, enc in encodings.items():
            real = len(enc.encode(text))
            errors[n].append(estimate / real - 1)
            cells.append(f"{real:>10} {estimate / real - 1:>+10.0%} ")
        print(f"{name:18} {len(text):>8} {estimate:>9} " + " ".join(cells))
    for name, body in bodies(texts).items():
        estimate = estimate_tokens(body)
        cells = []
        for n, enc in encodings.items():
            real = 3 + sum(3 + len(enc.encode(m["content"])) for m in body["messages"])
            errors[n].append(estimate / real - 1)
            cells.append(f"{real:>10} {estimate / real - 1:>+10.0%} ")
        print(f"{name:18} {'':>8} {estimate:>9} " + " ".join(cells))
    for n, errs in errors.items():
        mean_abs = sum(abs(e) for e in errs) / len(errs)
        print(f"{n}: error from {min(errs):+.0%} to {max(errs):+.0%}, mean |error| {mean_abs:.0%}")


if __name__ == "__main__":
    main()
