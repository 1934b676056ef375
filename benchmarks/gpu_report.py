"""The GPU check's verdicts and table in one page: reads what gpu_check.sh wrote to a folder and
writes report.md there (also printed).

  - the card (from the table's rows);
  - fp32 parity, official top-k ties pinned: every row's selection identical to the official
    code's and min cosine >= 0.99999 (parity_fp32.json, `ps3edge bench --official-ties pinned`);
  - bf16 parity at the real widths: the table's B=1 rows, min per-token cosine >= 0.99 against the
    official code made to take our patches; the selection against the official run as published
    is listed (bf16 near ties may pick other patches), not judged;
  - the public API's torch backend on CUDA against the CPU paths (run_parity.json's verdicts);
  - the table (table.json, gpu_table.py).
A section whose file is missing says so (skipped by the time guard, or failed: see log.txt).

    python benchmarks/gpu_report.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_table import markdown                                    # noqa: E402

FP32_MIN_COSINE = 0.99999
BF16_MIN_COSINE = 0.99


def load(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fp32_section(rows) -> list[str]:
    if not rows:
        return ["- fp32 parity (official ties pinned): NOT MEASURED (parity_fp32.json missing)"]
    bad = [r for r in rows if not (r.get("selection_identical") and r.get("min_cosine", 0) >= FP32_MIN_COSINE)]
    out = [f"- fp32 parity (official ties pinned; selection identical, min cosine >= {FP32_MIN_COSINE}): "
           f"{verdict(not bad)} over {len(rows)} rows ({', '.join(sorted({r['model'] for r in rows}))})"]
    out += [f"  - {r['model']} NLC={r['num_look_close']}: selection "
            f"{'identical' if r.get('selection_identical') else 'IoU %.3f' % r.get('selection_iou', 0)}, "
            f"min cosine {r.get('min_cosine', float('nan')):.6f}" for r in bad]
    return out


def bf16_section(rows) -> list[str]:
    ones = [r for r in rows or [] if "min_cosine" in r]
    if not ones:
        return [f"- bf16 parity (min cosine >= {BF16_MIN_COSINE}, same selection): NOT MEASURED (table.json has no B=1 rows)"]
    worst = min(r["min_cosine"] for r in ones)
    out = [f"- {ones[0]['dtype']} parity, the table's models at B=1 (min cosine >= {BF16_MIN_COSINE} against the "
           f"official code on our selection): {verdict(worst >= BF16_MIN_COSINE)}, worst {worst:.5f} over {len(ones)} rows"]
    out += [f"  - {r['model']} NLC={r['num_look_close']}: min cosine {r['min_cosine']:.5f}, max abs {r['max_abs']:.3g}; "
            f"selection against the official run as published: "
            f"{'identical' if r['selection_identical'] else 'IoU %.3f (not judged: near ties)' % r['selection_iou']}"
            for r in ones]
    return out


def api_section(report) -> list[str]:
    if not report:
        return ["- the API's torch backend on CUDA vs the CPU paths: NOT MEASURED (run_parity.json missing)"]
    out = [f"- the API's torch backend on {report['device']} vs the CPU paths (ps3-tiny-4k, 3840x2160): "
           f"{verdict(report.get('ok', False))}"]
    out += [f"  - {name}: {verdict(ok)}" for name, ok in report.get("verdicts", {}).items()]
    return out


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))
    table = load(folder, "table.json")
    fp32 = load(folder, "parity_fp32.json")
    api = load(folder, "run_parity.json")
    card = (table or fp32 or [{}])[0].get("device", "?") if (table or fp32) else (api or {}).get("device", "?")
    lines = [f"# GPU check: {card}", "", "## Verdicts", ""]
    lines += fp32_section(fp32) + bf16_section(table) + api_section(api)
    lines += ["", "## The table", ""]
    lines.append(markdown(table) if table else "NOT MEASURED (table.json missing)")
    text = "\n".join(lines) + "\n"
    tmp = folder / "report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / "report.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
