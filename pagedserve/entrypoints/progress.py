"""The progress bar of batch work (run-batch, LLM.generate): requests done, and the output tokens per
second so far, the figure that says whether the engine is kept busy."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm import tqdm  # here: `import pagedserve` stays cheap
        self.bar = tqdm(total=total, desc=desc, unit="req", disable=not enabled,
                        dynamic_ncols=True)
        self.output_tokens = 0
        self.started = time.perf_counter()

    def done(self, output_tokens: int) -> None:
        self.output_tokens += output_tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"output {self.output_tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def write(self, line: str) -> None:
        """A message above the bar, without breaking it."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
