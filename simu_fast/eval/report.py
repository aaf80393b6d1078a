"""report: the results of an unlearning comparison written to a folder: metrics.json (everything, NaN as
null), report.md (one row per method, one table per relearning kind) and PNG plots (the forget/retain
trade-off; relearning curves).

`results` is {method: {"forget": {metric: value}, "retain": {...}, "holdout": {...}, "relearning": [the dicts
of relearning_attack], "mia": {attack: {"auc", "privacy"}}, "forget_quality", "utility": {"perplexity",
"mc_accuracy"}, "wall_seconds", anything else}} (what evaluate_model returns, plus the time); every key but
"forget" and "retain" is optional, and an entry named like "memorized" or "original" is the reference model
(listed first, drawn as a star). Metric names are those of answer_metrics ("rougeL_recall", "answer_prob",
"exact_match") and "truth_ratio".

An entry's "original" ({"forget": {...}, "retain": {...}}: evaluate_model's scores of the model before
unlearning, given original_model) is the "before" of that entry: report.md puts an "original (before)" row
above the entry's row (labelled "(after)"), and the trade-off plot draws it as a star labelled "original" with
an arrow to the entry's point, so how far each method moved, or that it did not, is seen at once. Entries
that share an original get one row and one star.

Everything is rendered in memory first and each file is then written to a temporary file in out_dir and
os.replace'd over its name, so a failure (a bad value, a plotting error, a full disk) never leaves a
half-written file, and a failure before the writes leaves the previous report as it was.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os

from ..io import write_atomic

REFERENCE_NAMES = ("memorized", "memorized model", "original", "original model", "reference", "target")
SPLIT_METRICS = (("rougeL_recall", "ROUGE-L"), ("answer_prob", "prob"), ("exact_match", "EM"),
                 ("truth_ratio", "truth ratio"), ("exact_memorization", "exact mem."),
                 ("extraction_strength", "extraction str."))
SPLITS = ("forget", "retain", "holdout")
RELEARNING_COLUMNS = ("fraction", "lr", "steps", "metric", "n_train", "n_eval", "initial", "max", "final")


def report(results: dict, out_dir: str, title: str = "Unlearning report") -> dict:
    """Write metrics.json, report.md, tradeoff.png (when some method has forget and retain scores) and
    relearning.png (when some method has relearning curves) to out_dir; returns {"metrics", "markdown",
    "tradeoff", "relearning"}: the paths written (a plot that was not drawn is absent)."""
    _check_results(results)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    payloads = {"metrics": ("metrics.json", (json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
                            .encode("utf-8"))}
    plots = {"tradeoff": ("tradeoff.png", plot_tradeoff(results)),
             "relearning": ("relearning.png", plot_relearning(results))}
    markdown = format_markdown(results, title=title)
    images = [f"![{key}]({name})" for key, (name, data) in plots.items() if data is not None]
    if images:
        markdown += "\n" + "\n\n".join(images) + "\n"
    payloads["markdown"] = ("report.md", markdown.encode("utf-8"))
    payloads.update({key: value for key, value in plots.items() if value[1] is not None})

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for key in ("metrics", "markdown", "tradeoff", "relearning"):
        if key in payloads:
            name, data = payloads[key]
            written[key] = write_atomic(os.path.join(os.fspath(out_dir), name), data)
    return written


def format_markdown(results: dict, title: str | None = None) -> str:
    """The report's markdown: a table with one row per method (the reference model first; a column only
    where some method has a value for it; an "original (before)" row above the first method evaluated against
    that original), then one table per relearning kind."""
    _check_results(results)
    names = ordered_names(results)
    columns = _main_columns(results)
    originals = _originals(results)
    lines = [f"# {title}", ""] if title else []
    lines += [_row(["method"] + [c[0] for c in columns]), _row(["---"] * (len(columns) + 1))]
    shown_before = set()
    for name in names:
        original = _original_of(results[name])
        if original is not None:
            label, key = originals[name]
            if key not in shown_before:
                shown_before.add(key)
                lines.append(_row([_escape(f"{label} (before)")] + [_fmt(get(original)) for _, get in columns]))
        shown = f"{name} (after)" if original is not None else name
        lines.append(_row([_escape(shown)] + [_fmt(get(results[name])) for _, get in columns]))
    for kind in _relearning_kinds(results):
        lines += ["", f"## {kind} relearning", "",
                  _row(["method"] + list(RELEARNING_COLUMNS)), _row(["---"] * (len(RELEARNING_COLUMNS) + 1))]
        for name in names:
            for attack in _attacks(results[name], name):
                if attack.get("kind") == kind:
                    lines.append(_row([_escape(name)] + [_fmt(attack.get(c)) for c in RELEARNING_COLUMNS]))
    return "\n".join(lines) + "\n"


def tradeoff_points(results: dict) -> tuple[str, list[dict]] | None:
    """What the trade-off plot draws: (metric, points), each point {"name", "x" (forget), "y" (retain),
    "kind": "reference" | "original" | "method", "color", "from": (x, y) of the entry's original or None},
    reference models first, then the originals, then the methods. The metric is ROUGE-L recall, or the
    answer probability when no method has both ROUGE-L scores; None when no method has a forget and a retain
    score."""
    metric = next((m for m, _ in SPLIT_METRICS[:2] if any(
        _finite(_split_value(e, "forget", m)) and _finite(_split_value(e, "retain", m)) for e in results.values())),
        None)
    if metric is None:
        return None

    def xy(entry):
        x, y = _split_value(entry, "forget", metric), _split_value(entry, "retain", metric)
        return (float(x), float(y)) if _finite(x) and _finite(y) else None

    references, originals, methods = [], [], []
    drawn = set()  # the (x, y) of the stars so far: an original equal to a reference entry is one star
    labels = _originals(results)
    for i, name in enumerate(ordered_names(results)):
        at = xy(results[name])
        if _is_reference(name):
            if at is not None:
                references.append({"name": name, "x": at[0], "y": at[1], "kind": "reference", "color": "black",
                                   "from": None})
                drawn.add(at)
            continue
        original = _original_of(results[name])
        start = xy(original) if original is not None else None
        if start is not None and start not in drawn:
            drawn.add(start)
            originals.append({"name": labels[name][0], "x": start[0], "y": start[1], "kind": "original",
                              "color": "black", "from": None})
        if at is not None:
            methods.append({"name": name, "x": at[0], "y": at[1], "kind": "method", "color": f"C{i % 10}",
                            "from": start})
    return metric, references + originals + methods


def plot_tradeoff(results: dict) -> bytes | None:
    """PNG bytes of tradeoff_figure(results); None when there is nothing to plot."""
    figure = tradeoff_figure(results)
    return None if figure is None else _png(*figure)


def tradeoff_figure(results: dict):
    """(Figure, canvas): forget (x) against retain (y) scores, one labelled point per method, a star per
    reference model and per original (the model before unlearning; an arrow from it to each method evaluated
    against it): the points of tradeoff_points. None when there is nothing to plot."""
    drawn = tradeoff_points(results)
    if drawn is None:
        return None
    metric, points = drawn
    fig, canvas = _figure((6.4, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    sides = ((10, 10), (10, -16), (-14, 12), (-14, -18))
    labelled = set()  # (x, y, side) taken: points at one place (a method that did not move) get other sides
    for i, point in enumerate(points):
        x, y, star = point["x"], point["y"], point["kind"] != "method"
        if point["from"] is not None and point["from"] != (x, y):
            ax.annotate("", (x, y), xytext=point["from"], zorder=2,
                        arrowprops={"arrowstyle": "->", "color": point["color"], "alpha": 0.5, "linewidth": 0.8,
                                    "shrinkA": 6, "shrinkB": 5})
        # stars above the dots: an original under an unmoved method's dot stays visible
        ax.scatter([x], [y], s=160 if star else 60, marker="*" if star else "o", zorder=4 if star else 3,
                   color=point["color"], edgecolors="white", linewidths=0.8, label=point["name"])
        side = next((k % 4 for k in range(i, i + 4) if (x, y, k % 4) not in labelled), i % 4)  # alternate sides
        labelled.add((x, y, side))
        dx, dy = sides[side]
        ax.annotate(point["name"], (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9,
                    ha="left" if dx > 0 else "right",
                    arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.6},
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.85})
    label = "ROUGE-L recall" if metric == "rougeL_recall" else "answer probability"
    ax.set_xlabel(f"forget {label} (lower is better)")
    ax.set_ylabel(f"retain {label} (higher is better)")
    ax.set_xlim(-0.05, 1.1)
    ax.set_ylim(-0.05, 1.1)
    ax.grid(True, alpha=0.3)
    ax.text(0.98, 0.02, "better: top left (forgets, keeps the rest)", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=8, color="0.4")
    ax.set_title("forget / retain trade-off")
    return fig, canvas


def plot_relearning(results: dict) -> bytes | None:
    """PNG bytes: the forget score against the relearning step, one panel per kind, one line per method (and
    per attack setting when a method has several); None when no method has relearning curves."""
    kinds = _relearning_kinds(results)
    if not kinds:
        return None
    fig, canvas = _figure((5.2 * len(kinds), 4.2))
    names = ordered_names(results)
    for k, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), k + 1)
        metrics = set()
        for i, name in enumerate(names):
            attacks = [a for a in _attacks(results[name], name) if a.get("kind") == kind and a.get("curve")]
            for j, attack in enumerate(attacks):
                metric = attack.get("metric")
                metrics.add(str(metric))
                points = [(c.get("step"), c.get(metric)) for c in attack["curve"]]
                points = [(s, v) for s, v in points if _finite(s) and _finite(v)]
                if not points:
                    continue
                label = name if len(attacks) == 1 else f"{name} (lr={_fmt(attack.get('lr'))})"
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3,
                        color="black" if _is_reference(name) else f"C{i % 10}", linestyle=("-", "--", ":")[j % 3],
                        label=label)
        ax.set_title(f"{kind} relearning")
        ax.set_xlabel("relearning step")
        ax.set_ylim(-0.02, 1.02)  # both metrics lie in [0, 1]: panels and runs compare at a glance
        ax.set_ylabel("forget " + " / ".join(sorted(metrics)))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig, canvas)


def to_jsonable(value):
    """A copy of value that json can write strictly: NaN and infinities -> None, tuples -> lists, numpy and
    torch scalars -> Python numbers, keys -> str. Anything else raises TypeError naming its type."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # 0-d numpy arrays and torch tensors
    if callable(item) and getattr(value, "ndim", None) == 0:
        return to_jsonable(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot write a {type(value).__name__} to metrics.json: {value!r}")


def ordered_names(results: dict) -> list:
    """The method names, reference model(s) first, the rest in the order given."""
    names = list(results)
    return [n for n in names if _is_reference(n)] + [n for n in names if not _is_reference(n)]


def _check_results(results):
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict {{method: {{'forget': ..., 'retain': ...}}}}, got "
                        f"{type(results).__name__}")
    if not results:
        raise ValueError("results is empty: nothing to report (give {method: {'forget': {...}, 'retain': {...}}})")
    for name, entry in results.items():
        if not isinstance(name, str):
            raise TypeError(f"method names must be str, got {name!r}")
        if not isinstance(entry, dict):
            raise TypeError(f"results[{name!r}] must be a dict, got {type(entry).__name__}")
        for split in SPLITS + ("mia", "utility", "original"):
            if entry.get(split) is not None and not isinstance(entry[split], dict):
                raise TypeError(f"results[{name!r}][{split!r}] must be a dict, got {type(entry[split]).__name__}")
        for split in SPLITS:
            value = (entry.get("original") or {}).get(split)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"results[{name!r}]['original'][{split!r}] must be a dict, got {type(value).__name__}")
        _attacks(entry, name)


def _original_of(entry: dict):
    """The entry's original-model scores ({"forget": ..., "retain": ...}), None when it has none."""
    original = entry.get("original")
    return original if original and any(original.get(split) for split in SPLITS) else None


def _originals(results: dict) -> dict:
    """{name: (label, key)} for each entry with original scores: entries whose originals score the same share
    a key (one row, one star); the label is "original", or "original of NAME" when the entries have different
    originals."""
    keys = {name: json.dumps(to_jsonable({s: _original_of(e).get(s) for s in SPLITS}), sort_keys=True)
            for name, e in results.items() if _original_of(e) is not None}
    first = {}
    for name, key in keys.items():
        first.setdefault(key, name)
    if len(first) == 1:
        return {name: ("original", key) for name, key in keys.items()}
    return {name: (f"original of {first[key]}", key) for name, key in keys.items()}


def _attacks(entry: dict, name: str) -> list:
    attacks = entry.get("relearning")
    if attacks is None:
        return []
    if isinstance(attacks, dict):  # one attack given alone
        attacks = [attacks]
    if not isinstance(attacks, (list, tuple)) or not all(isinstance(a, dict) for a in attacks):
        raise TypeError(f"results[{name!r}]['relearning'] must be a list of relearning_attack dicts")
    return list(attacks)


def _relearning_kinds(results: dict) -> list:
    kinds = []
    for name, entry in results.items():
        for attack in _attacks(entry, name):
            kind = str(attack.get("kind", "unknown"))
            if kind not in kinds:
                kinds.append(kind)
    return kinds


def _main_columns(results: dict) -> list:
    """[(header, entry -> value)] for every column some method has a value for."""
    candidates = []
    for metric, short in SPLIT_METRICS:
        for split in SPLITS:
            candidates.append((f"{split} {short}", lambda e, s=split, m=metric: _split_value(e, s, m)))
    mia = []
    for entry in results.values():
        for attack in (entry.get("mia") or {}):
            if attack not in mia:
                mia.append(attack)
    for attack in mia:
        candidates.append((f"MIA AUC ({attack})", lambda e, a=attack: _mia_auc(e, a)))
    relearned = []
    for name, entry in results.items():
        for attack in _attacks(entry, name):
            key = (str(attack.get("kind", "unknown")), str(attack.get("metric", "")))
            if key not in relearned:
                relearned.append(key)
    for kind, metric in relearned:
        candidates.append((f"relearned max ({kind}, {metric})",
                           lambda e, k=kind, m=metric: _relearned_max(e, k, m)))
    candidates.append(("forget quality", lambda e: e.get("forget_quality")))
    for key, header in (("d_plus", "D+ (erased)"), ("d_minus", "D- (hidden)"), ("erase_share", "D+ / (D+ + D-)")):
        candidates.append((header, lambda e, k=key: (e.get("erase_or_hide") or {}).get(k)))
    candidates.append(("perplexity", lambda e: (e.get("utility") or {}).get("perplexity")))
    candidates.append(("MC accuracy", lambda e: (e.get("utility") or {}).get("mc_accuracy")))
    bits = sorted({b for e in results.values() for b in ((e.get("quantization") or {}).get("quantized") or {})},
                  key=lambda b: -int(b))
    for b in bits:
        candidates.append((f"forget at {b}-bit", lambda e, b=b: ((e.get("quantization") or {}).get("quantized")
                                                                  or {}).get(b)))
    candidates.append(("model utility", lambda e: (e.get("model_utility") or {}).get("model_utility")))
    for key, header in (("verbmem_f", "MUSE VerbMem forget"), ("knowmem_f", "MUSE KnowMem forget"),
                        ("knowmem_r", "MUSE KnowMem retain"), ("privleak", "MUSE PrivLeak")):
        candidates.append((header, lambda e, k=key: (e.get("muse") or {}).get(k)))
    tasks = sorted({t for e in results.values() for t in (e.get("lm_eval") or {})})
    for task in tasks:
        candidates.append((f"{task} (lm-eval)", lambda e, t=task: _lm_eval_main((e.get("lm_eval") or {}).get(t))))
    candidates.append(("time (s)", lambda e: _seconds(e.get("wall_seconds"))))
    return [c for c in candidates if any(c[1](e) is not None for e in results.values())]


def _lm_eval_main(metrics):
    """A task's headline number in lm-eval's results: acc_norm, else acc, else its first non-stderr metric."""
    if not metrics:
        return None
    for name in ("acc_norm,none", "acc,none"):
        if name in metrics:
            return metrics[name]
    return next((v for k, v in sorted(metrics.items()) if "stderr" not in k), None)


def _split_value(entry: dict, split: str, metric: str):
    return (entry.get(split) or {}).get(metric)


def _mia_auc(entry: dict, attack: str):
    value = (entry.get("mia") or {}).get(attack)
    return value.get("auc") if isinstance(value, dict) else value


def _relearned_max(entry: dict, kind: str, metric: str):
    """The worst case over the method's attacks of this kind and metric (None when it has none)."""
    values = [a.get("max") for a in _attacks(entry, "") if str(a.get("kind", "unknown")) == kind
              and str(a.get("metric", "")) == metric]
    finite = [float(v) for v in values if _finite(v)]
    if finite:
        return max(finite)
    return math.nan if values else None


def _seconds(value):
    """Seconds to one decimal: a str so that _fmt leaves it as it is."""
    return f"{float(value):.1f}" if _finite(value) else value


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3f}"
    return _escape(str(value))


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _is_reference(name: str) -> bool:
    return name.strip().lower() in REFERENCE_NAMES


def _figure(size):
    """A Figure on its own Agg canvas: no pyplot, so no global backend state and no GUI."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover
        raise ImportError("the report's plots need matplotlib (pip install matplotlib)") from e
    fig = Figure(figsize=size, dpi=100)
    return fig, FigureCanvasAgg(fig)


def _png(fig, canvas) -> bytes:
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()
