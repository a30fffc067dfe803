"""Part of `make demo`: a streamed chat through the agent with the official `openai` client.

demo_chat.py URL MODEL      (the key comes from $LLMFLEET_USER_KEY)
"""

from __future__ import annotations

import os
import sys
import time

import openai


def main() -> int:
    url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ["LLMFLEET_USER_KEY"])
    question = "Private models on our own GPUs, with company logins and a bill that stops when idle"
    print(f"   you: {question}")
    print("   model: ", end="", flush=True)
    started = time.perf_counter()
    first = None
    pieces = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    took = time.perf_counter() - started
    ttfb = (first or started) - started
    print(f"\n   ({pieces} pieces streamed in {took:.2f}s, first after {ttfb * 1000:.0f} ms)")
    return 0 if pieces else 1


if __name__ == "__main__":
    sys.exit(main())
