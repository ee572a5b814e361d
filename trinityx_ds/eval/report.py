"""Evaluation reports: one folder per evaluation (report.json, report.md, per-item JSONL, figures),
and `trinityx eval compare`, which puts several such folders side by side."""
from __future__ import annotations

import json
from pathlib import Path

DETAIL_FILES = {"generate": "generations.jsonl"}
METRICS = ("accuracy", "ece", "ece_mass", "mce", "brier", "nll")


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_report(out_dir: str | Path, report: dict, details: dict[str, list[dict]]) -> Path:
    """Writes report.json, report.md and `<suite>.jsonl` (generations.jsonl for `generate`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for suite, rows in details.items():
        if rows:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (out / DETAIL_FILES.get(suite, f"{suite}.jsonl")).write_text(text, encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return out


def _calibration_rows(r: dict) -> list[str]:
    lines = ["| prediction | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    t = r.get("temperature", {})
    named = [("as routed (mean token probabilities)", "routed"),
             (f"before: current T {', '.join(_f(x) for x in sorted(set(t.get('current', []))))}", "before"),
             (f"after: fitted global T {_f(t.get('global'))}", "after")]
    for label, key in named:
        if key in r:
            lines.append(f"| {label} | " + " | ".join(_f(r[key][m]) for m in METRICS) + " |")
    return lines


def render_markdown(report: dict) -> str:
    s = report["suites"]
    lines = [f"# Evaluation of `{report['variant']}`", "",
             f"Model: `{report['checkpoint']}`; {report['world_size']} process(es), TP {report['tp']}, "
             f"DP {report['dp']}; limit {report.get('limit')}; {report['seconds']:.0f} s.", ""]
    if "truthfulqa_mc" in s:
        r = s["truthfulqa_mc"]
        lines += ["## TruthfulQA multiple choice", "", f"MC1 **{_f(r['mc1'])}**, MC2 **{_f(r['mc2'])}** "
                  f"on {r['n']} questions (`{r['source']}`).", ""]
    if "hh_preference" in s:
        lines += ["## HH-RLHF preference (log p(chosen) > log p(rejected))", "",
                  "| set | accuracy | mean margin (nats) | pairs |", "|---|---|---|---|"]
        lines += [f"| {k} | {_f(v['accuracy'])} | {_f(v['mean_margin'])} | {v['n']} |"
                  for k, v in s["hh_preference"].items()]
        lines.append("")
    if "routing" in s:
        r = s["routing"]
        lines += ["## Router calibration (task prediction on held-out examples)", ""]
        if "skipped" in r:
            lines += [f"Skipped: {r['skipped']}.", ""]
        else:
            lines += [f"{r['n']} held-out examples; T fitted on {r.get('n_val', 0)}, "
                      f"metrics on the other {r.get('n_test', r['n'])}." + (f" Fit skipped: {r['fit_skipped']}."
                                                                           if "fit_skipped" in r else ""), ""]
            lines += _calibration_rows(r) + [""]
            if r.get("per_layer"):
                lines += ["| layer | T | ECE | fitted T | ECE after |", "|---|---|---|---|---|"]
                lines += [f"| {p['layer']} | {_f(p['temperature'])} | {_f(p['ece_before'])} | "
                          f"{_f(p['fitted_temperature'])} | {_f(p['ece_after'])} |" for p in r["per_layer"]]
                lines.append("")
            lines += [f"![{f}]({f})" for f in r.get("figures", [])] + [""]
    if "generate" in s:
        r = s["generate"]
        lines += ["## Generation", "", f"{r['n']} prompts, up to {r['max_new_tokens']} new tokens "
                  f"(temperature {r['temperature']}), {r['mean_output_chars']:.0f} characters on average: "
                  "`generations.jsonl`.", ""]
        if "judge" in r:
            lines += ["Judge: " + ", ".join(f"{k} {_f(v) if isinstance(v, float) else v}"
                                           for k, v in r["judge"].items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- compare

def compare_row(folder: str | Path) -> dict:
    """The headline numbers of one evaluation folder (None where a suite did not run)."""
    rep = json.loads((Path(folder) / "report.json").read_text())
    s = rep["suites"]
    tqa, hh, rt = s.get("truthfulqa_mc", {}), s.get("hh_preference", {}), s.get("routing", {})
    row = {"evaluation": Path(folder).name, "variant": rep["variant"], "mc1": tqa.get("mc1"), "mc2": tqa.get("mc2")}
    row.update({f"pref_{name}": v["accuracy"] for name, v in hh.items()})
    row.update({"routing_acc": rt.get("routed", {}).get("accuracy"), "ece_before": rt.get("before", {}).get("ece"),
                "ece_after": rt.get("after", {}).get("ece"), "fitted_T": rt.get("temperature", {}).get("global")})
    return row


def compare(folders: list[str | Path]) -> tuple[list[str], list[dict]]:
    """(columns, rows): every preference set found in any folder gets a column."""
    rows = [compare_row(f) for f in folders]
    prefs = sorted({k for r in rows for k in r if k.startswith("pref_")})
    columns = ["evaluation", "variant", "mc1", "mc2", *prefs, "routing_acc", "ece_before", "ece_after", "fitted_T"]
    return columns, [{c: r.get(c) for c in columns} for r in rows]


def compare_markdown(columns: list[str], rows: list[dict]) -> str:
    titles = {"mc1": "MC1", "mc2": "MC2", "routing_acc": "routing acc", "ece_before": "ECE before T",
              "ece_after": "ECE after T", "fitted_T": "fitted T"}
    head = [titles.get(c, c.replace("pref_", "pref ")) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else _f(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"
