"""The sampler and the LM head, per decode step, before and after issue 22's changes, side by side
in one process:

    python benchmarks/sampler.py --output sampler.json

For each batch (1, 32, 256 sequences) and vocabulary (49,152: SmolLM2; 151,936: Qwen2), the LM
head (hidden [batch, --hidden] @ [vocab, --hidden]^T, float32, as worker/cpu/linear.py runs it) and
the sampler on its logits, for greedy rows, temperature 1, temperature + top-p 0.9, temperature +
top-k 50, temperature + top-k 50 + top-p 0.9, and mixed batches (greedy or temperature 1 rows
where every 16th row, at least one, asks for presence and repetition penalties, logit_bias and 5
logprobs). "before" is the code at --before (main before the change), read from git and imported
under other names; "after" is this tree's. Calls alternate between the two, round by round, and
each keeps its fastest round (the best estimate of the code's own cost on a shared machine), its
median (how noisy the rounds were), and the fastest round's CPU time over all threads (on a machine
whose cores other processes share, the least disturbed measure of work).

Like the worker, the process first applies worker/cpu/host_memory.py's malloc settings (this tree's
version, to both sides); --glibc-defaults leaves malloc as it is, to measure what they save: with
glibc's defaults every logits-sized temporary is a fresh mapping that faults in again.

--logits model (the default) makes rows shaped like a model's: normal noise (sd 1.5) plus a boost
of 12 * exp(-rank / 300) over a random order, so top-p 0.9 keeps a median ~50 tokens and 0.95 ~80-120
(SmolLM2-135M-Instruct writing a story at temperature 1: 26 and 91). --logits flat is normal noise
alone, like the no-op model's dummy weights: there top-p keeps most of the vocabulary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pagedserve.v1 import worker_pb2  # noqa: E402
from pagedserve.worker.batch import PersistentBatch, SequenceState  # noqa: E402
from pagedserve.worker.cpu.host_memory import keep_freed_memory  # noqa: E402
from pagedserve.worker.cpu import linear as linear_after  # noqa: E402
from pagedserve.worker import sampler as sampler_after  # noqa: E402

BEFORE = "05a87d3"  # main before issue 22's sampler and LM head changes
MODES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_k": dict(temperature=1.0, top_k=50),
    "top_k_top_p": dict(temperature=1.0, top_k=50, top_p=0.9),
    "mixed_greedy": dict(temperature=0.0),
    "mixed_temperature": dict(temperature=1.0),
}
SPECIAL = dict(presence_penalty=0.5, repetition_penalty=1.2, logit_bias={11: 2.0, 12: -3.0}, logprobs=5)


def load_before(rev: str, tmp: Path) -> types.SimpleNamespace:
    """worker/sampler.py (with the token_bans and structured_output it imports) and
    worker/cpu/linear.py (with its linear.c) as they were at `rev`."""
    def show(path):
        return subprocess.check_output(["git", "show", f"{rev}:{path}"], cwd=ROOT, text=True)

    def module(name, path, file):
        m = types.ModuleType(f"before_{name}")
        m.__file__ = str(file)
        sys.modules[m.__name__] = m  # dataclasses look their module up
        exec(compile(show(path), str(file), "exec"), m.__dict__)
        return m

    (tmp / "linear.c").write_text(show("worker/cpu/linear.c"))
    linear = module("linear", "worker/cpu/linear.py", tmp / "linear.py")
    deps = {"pagedserve.worker.token_bans": module("token_bans", "worker/token_bans.py", tmp / "token_bans.py"),
            "pagedserve.worker.structured_output": module("structured_output", "worker/structured_output.py",
                                               tmp / "structured_output.py")}
    saved = {name: sys.modules.get(name) for name in deps}
    sys.modules.update(deps)  # the old sampler's imports resolve to the old modules
    try:
        sampler = module("sampler", "worker/sampler.py", tmp / "sampler.py")
    finally:
        for name, m in saved.items():
            if m is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = m
    return types.SimpleNamespace(linear=linear, sampler=sampler)


def batch_of(mode: str, batch: int, vocab: int, options) -> list[SequenceState]:
    """`batch` live sequences of a persistent batch (64 prompt tokens, 32 generated), sampling with
    the params `options` builds (this tree's SamplingOptions, or --before's for its sampler)."""
    rows = PersistentBatch(block_size=16, num_blocks=1, max_model_len=96, vocab_size=vocab, max_num_seqs=batch)
    seqs = []
    for i in range(batch):
        params = dict(MODES[mode])
        if mode.startswith("mixed") and i % 16 == 0:
            params.update(SPECIAL)
        prompt = [(i * 7 + j) % vocab for j in range(64)]
        generated = [(i * 13 + j) % vocab for j in range(32)]
        seq = rows.add(worker_pb2.NewSequence(seq_id=i, token_ids=prompt + generated, num_generated=len(generated)))
        seq.params = options(**params)
        seqs.append(seq)
    return seqs


def _once(fn) -> tuple[float, float]:
    """(wall ms, CPU ms of the whole process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def compare(before, after, rounds: int) -> dict:
    """ms per call of each, alternating; the first call of each is a warm-up."""
    before(), after()
    times = {"before": [], "after": []}
    for _ in range(rounds):
        times["before"].append(_once(before))
        times["after"].append(_once(after))
    out = {}
    for side, runs in times.items():
        wall = [w for w, _ in runs]
        out[side] = {"min_ms": round(min(wall), 3), "median_ms": round(statistics.median(wall), 3),
                     "cpu_ms_of_min": round(min(runs)[1], 3)}
    out["speedup"] = round(out["before"]["min_ms"] / out["after"]["min_ms"], 2)
    out["cpu_speedup"] = round(out["before"]["cpu_ms_of_min"] / max(out["after"]["cpu_ms_of_min"], 1e-3), 2)
    return out


def make_logits(shape: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if shape == "flat":
        return torch.randn(rows, vocab, generator=g)
    boost = 12 * torch.exp(-torch.arange(vocab) / 300.0)
    order = torch.rand(rows, vocab, generator=g).argsort(dim=-1)
    return torch.randn(rows, vocab, generator=g) * 1.5 + boost[order]


def lm_heads(old, vocab: int, hidden: int):
    torch.manual_seed(0)
    linear = nn.Linear(hidden, vocab, bias=False)
    new_kernel, old_kernel = linear_after.linear_rows(), old.linear.linear_rows()
    return (old.linear.CpuLinear(linear, old_kernel) if old_kernel else old.linear.PackedLinear(linear),
            linear_after.CpuLinear(linear, new_kernel) if new_kernel else linear_after.PackedLinear(linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--vocabs", default="49152,151936")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--hidden", type=int, default=128, help="the LM head's input size (the no-op model's 128)")
    parser.add_argument("--logits", choices=("model", "flat"), default="model", help="the rows' shape (see above)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare against")
    parser.add_argument("--threads", type=int, help="torch's threads (default: its own choice); with 1, CPU "
                        "time is the work itself, not also another thread's spinning while a busy machine delays it")
    parser.add_argument("--glibc-defaults", action="store_true", help="leave malloc's settings as they are")
    parser.add_argument("--output", help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "glibc defaults" if args.glibc_defaults else keep_freed_memory()
    print(malloc, flush=True)

    results = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        old = load_before(args.before, Path(tmp))
        for vocab in map(int, args.vocabs.split(",")):
            head_before, head_after = lm_heads(old, vocab, args.hidden)
            new_sampler = sampler_after.Sampler(vocab, [0], seed=0, device="cpu")
            old_sampler = old.sampler.Sampler(vocab, [0], seed=0, device="cpu")
            for batch in map(int, args.batches.split(",")):
                hidden = torch.randn(batch, args.hidden)
                row = compare(lambda: head_before(hidden), lambda: head_after(hidden), args.rounds)
                results.append({"what": "lm_head", "vocab": vocab, "batch": batch, "hidden": args.hidden, **row})
                print_row(results[-1])
                logits = make_logits(args.logits, batch, vocab, seed=batch)
                for mode in args.modes.split(","):
                    seqs_before = batch_of(mode, batch, vocab, old.sampler.SamplingOptions)
                    seqs_after = batch_of(mode, batch, vocab, sampler_after.SamplingOptions)
                    row = compare(lambda: old_sampler(logits, seqs_before), lambda: new_sampler(logits, seqs_after),
                                  args.rounds)
                    results.append({"what": f"sampler/{mode}", "vocab": vocab, "batch": batch, **row})
                    print_row(results[-1])
    if args.output:
        Path(args.output).write_text(json.dumps({"before": args.before, "threads": torch.get_num_threads(),
                                                 "malloc": malloc, "hidden": args.hidden,
                                                 "logits": args.logits, "rounds": args.rounds,
                                                 "results": results}, indent=1))


def print_row(r: dict) -> None:
    b, a = r["before"], r["after"]
    print(f"{r['what']:<26} vocab {r['vocab']:>6} batch {r['batch']:>3}: before {b['min_ms']:8.2f} ms "
          f"(median {b['median_ms']:8.2f}, cpu {b['cpu_ms_of_min']:8.2f})  after {a['min_ms']:8.2f} ms "
          f"(median {a['median_ms']:8.2f}, cpu {a['cpu_ms_of_min']:8.2f})  x{r['speedup']} (cpu x{r['cpu_speedup']})",
          flush=True)


if __name__ == "__main__":
    main()
