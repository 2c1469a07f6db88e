"""One user at a time (`bench compare --max-concurrency 1`, preset as `bench one-user`): what a
single client waits for, each system's median time per output token (TPOT) and time to first
token (TTFT), and pagedserve's as a fraction of each: ratio = pagedserve's median / the system's
median, so below 1.0 pagedserve is faster, above 1.0 slower (issue 33's bar: TPOT ratio <= 1)."""
from __future__ import annotations

from .metrics import format_ms

LATENCY_KEYS = {"tpot": "median_tpot_ms", "ttft": "median_ttft_ms"}


def is_one_user(args) -> bool:
    return args.max_concurrency == 1


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def latency_ratios(rows: dict[str, dict]) -> dict[str, dict]:
    """Per row that measured a TPOT (streamed servers, transformers): its median TPOT and TTFT in
    ms and `tpot_ratio`/`ttft_ratio`, pagedserve's median over the row's (None without a streamed
    pagedserve row)."""
    base = rows.get("pagedserve")
    found = {}
    for name, s in rows.items():
        if s.get("median_tpot_ms") is None:
            continue
        entry = {key: s[key] for key in LATENCY_KEYS.values()}
        for stem, key in LATENCY_KEYS.items():
            entry[f"{stem}_ratio"] = ratio(base[key], s[key]) if base else None
        found[name] = entry
    return found


def format_one_user(found: dict[str, dict]) -> str:
    """The one-user table: ratios as "0.81x", "-" where none."""
    header = f"{'system':<34}{'median TPOT ms':>16}{'median TTFT ms':>16}{'pagedserve/it TPOT':>20}{'TTFT':>8}"
    lines = ["", "One user (ratio: pagedserve's median over the system's; below 1.0x pagedserve is faster):",
             header, "-" * len(header)]
    for name, e in found.items():
        tpot, ttft = (("-" if e[f"{k}_ratio"] is None else f"{e[f'{k}_ratio']:.2f}x") for k in LATENCY_KEYS)
        lines.append(f"{name:<34}{format_ms(e['median_tpot_ms'], 1):>16}{format_ms(e['median_ttft_ms'], 0):>16}"
                     f"{tpot:>20}{ttft:>8}")
    return "\n".join(lines)
