"""Collect benchmarks/index.py and index_interleaved.py results over several data folders into one JSON
and the markdown tables of docs/bench-index.md.

Usage:
    python benchmarks/index_report.py OUT.json DATA_DIR [DATA_DIR ...] [--budget 64M]
"""

from __future__ import annotations

import argparse
import json
import os


def _load(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def collect(dirs: list[str], budget: str) -> dict:
    out = {}
    for d in dirs:
        name = os.path.basename(os.path.normpath(d))
        runs = {r["key"]: r for r in (_load(os.path.join(d, f"results-{budget}.json")) or [])}
        for key in ("autofaiss", "ours-a", "ours-b", "ours-c"):
            r = _load(os.path.join(d, f"out-{key}-{budget}.json"))
            if r is not None:
                runs[key] = {**r, "key": key}
            meta = _load(os.path.join(d, f"out-{key}-{budget}", "index.json"))
            if meta is not None and key in runs:
                runs[key]["rotation"] = meta["indices"]["image"].get("rotation")
        out[name] = {
            "stats": _load(os.path.join(d, "stats.json")),
            "runs": runs,
            "interleaved": _load(os.path.join(d, f"interleaved-{budget}.json")),
        }
    return out


def _ms(r: dict, k: str) -> str:
    return f"{r[k]:.1f}" if k in r else "–"


def tables(res: dict) -> str:
    lines = [
        "| data | run | index | rotation | tuned on | params | recall@10 text | build s wall / CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in res.items():
        for key in ("autofaiss", "ours-a", "ours-b", "ours-c"):
            r = g["runs"].get(key)
            if not r:
                continue
            rot = (r.get("rotation") or {}).get("chosen")
            tuned = (
                (r.get("tuning") or {}).get("text_like_source", "")
                if key != "autofaiss"
                else "its own (image vectors)"
            )
            tuned = "nothing: budget rule" if tuned.startswith("none") else tuned
            params = (
                r["params"]
                if isinstance(r["params"], str)
                else ", ".join(f"{k} {v}" for k, v in r["params"].items())
            )
            lines.append(
                f"| {name} | {key} | `{r['factory']}` | {rot or '–'} | {tuned} | {params} | "
                f"{r['recall_at_10_text']:.3f} | {r['build_s']:.0f} / {r.get('build_cpu_s', 0):.0f} |"
            )
    lines += [
        "",
        "| data | mode | clipsearch: recall / CPU ms / wall ms | autofaiss: recall / CPU ms / wall ms | gain | autofaiss re-tuned on the same queries: recall / CPU ms | gain over it |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in res.items():
        inter = g["interleaved"] or {}
        for mode in ("a", "b", "c"):
            m = inter.get(mode)
            if not m:
                continue
            o, a, s = m["ours"], m["autofaiss"], m.get("autofaiss_same_info")
            same = (
                f"{s['recall_at_10_text']:.3f} / {s['cpu_ms_1thread']:.1f}" if s else "– (nothing to tune on)"
            )
            gain_s = f"{o['recall_at_10_text'] - s['recall_at_10_text']:+.3f}" if s else "–"
            lines.append(
                f"| {name} | {mode} | **{o['recall_at_10_text']:.3f}** / {o['cpu_ms_1thread']:.1f} / {o['single_query_ms_median']:.1f} | "
                f"{a['recall_at_10_text']:.3f} / {a['cpu_ms_1thread']:.1f} / {a['single_query_ms_median']:.1f} | "
                f"**{o['recall_at_10_text'] - a['recall_at_10_text']:+.3f}** | {same} | {gain_s} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--budget", default="64M")
    args = ap.parse_args()
    res = collect(args.dirs, args.budget)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(tables(res))


if __name__ == "__main__":
    main()
