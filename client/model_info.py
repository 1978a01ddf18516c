"""Print a model file's card, for a privacy officer and a clinician:

    python -m client.model_info MODEL [--json]

What the model diagnoses, the input it expects, how it was trained, the privacy record of that
training, the adaptation and decision rule a new site should use, what was done to the weights,
and their hash (verified on loading). `--json` prints the card as JSON instead. Exit code 0 for a
verified file; otherwise a one-paragraph error on stderr and exit code 2. Nothing is written, and
nothing in the file is executed (`common.model_file`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _num(value: Any, fmt: str = ".4g") -> str:
    return "n/a" if value is None else format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _hospital_list(ids: Sequence[int]) -> str:
    return ", ".join(str(h) for h in ids) if ids else "none recorded"


def render(card: dict[str, Any], *, path: str) -> str:
    """The card as text, in the order a reader needs it."""
    lines = [f"Model file {path}", f"  {card['format']}, format version {card['format_version']}, "
                                  f"created {card.get('created', 'n/a')}", ""]
    lines += _what_it_diagnoses(card)
    lines += _input_it_expects(card)
    lines += _how_it_was_trained(card)
    lines += _privacy(card["privacy"])
    lines += _for_a_new_site(card)
    lines += _history(card)
    lines += _weights_and_code(card)
    return "\n".join(lines)


def _what_it_diagnoses(card: dict[str, Any]) -> list[str]:
    ds = card["dataset"]
    lines = ["WHAT IT DIAGNOSES",
             f"  Dataset {ds['flag']} (MedMNIST), task {ds['task']}, {len(ds['labels'])} labels:"]
    lines += [f"    {k}: {name}" for k, name in sorted(ds["labels"].items(), key=lambda kv: int(kv[0]))]
    ev = card.get("evaluation")
    if ev:
        acc, auc = _num(ev.get("accuracy"), ".3f"), _num(ev.get("auc"), ".3f")
        acc0, auc0 = _num(ev.get("accuracy_before_adaptation"), ".3f"), _num(ev.get("auc_before_adaptation"), ".3f")
        lines.append(f"  Held-out test hospitals ({_num(ev.get('hospitals'))}), after adapting on "
                     f"{_num(ev.get('shots_per_class'))} records per class: accuracy {acc}, AUC {auc} "
                     f"(before adaptation {acc0} / {auc0})")
    lines.append("")
    return lines


def _input_it_expects(card: dict[str, Any]) -> list[str]:
    arch, inp = card["architecture"], card["input"]
    c, h, w = inp["shape"]
    return ["INPUT IT EXPECTS",
            f"  {c}x{h}x{w} {inp['channel_order']} image, {inp['layout']} {inp['dtype']}: {inp['pixels']}, scaled "
            f"as {inp['formula']} (range [{inp['range'][0]:g}, {inp['range'][1]:g}]; mean {inp['mean']:g}, "
            f"std {inp['std']:g})",
            f"  Model: {arch['class']}(in_channels={arch['in_channels']}, num_classes={arch['num_classes']}, "
            f"width={arch['width']}, groups={arch['groups']}, activation={arch['activation']}); "
            f"output: {card['output']['probabilities']}", ""]


def _how_it_was_trained(card: dict[str, Any]) -> list[str]:
    run = card["training"]
    return ["HOW IT WAS TRAINED",
            f"  {run['algorithm']}, {run['rounds_completed']} of {run['num_server_rounds']} rounds, "
            f"seed {run['seed']}",
            f"  training hospitals: {_hospital_list(run['training_hospitals'])}; "
            f"held out (never trained on): {_hospital_list(run['held_out_hospitals'])}", ""]


def _privacy(priv: dict[str, Any]) -> list[str]:
    lines = ["PRIVACY"]
    if not priv["dp"]:
        lines += ["  !!! NO DIFFERENTIAL PRIVACY (dp=false) !!!",
                  "  This model was trained WITHOUT differential privacy: there is NO bound on what it reveals about",
                  "  any patient record of the training hospitals. Treat it like those hospitals' patient data.",
                  "  rounds per hospital: " + (", ".join(f"hospital {hid} {rec['rounds_participated']}"
                                                           for hid, rec in priv["hospitals"].items()) or "none")]
    else:
        acc = priv.get("accountant") or {}
        orders = acc.get("orders") or []
        lines += [f"  Differential privacy ON. Unit of privacy: {priv['unit']}.",
                  f"  Target epsilon (ε) <= {_num(priv['target_epsilon'], 'g')}, "
                  f"delta (δ) = {_num(priv['target_delta'], 'g')}; "
                  f"accountant {acc.get('name', 'n/a')}"
                  + (f" over {len(orders)} orders {orders[0]:g}..{orders[-1]:g}" if orders else ""),
                  f"  {'hospital':>8}  {'ε':>8}  {'δ':>8}  rounds  declined"]
        for hid, rec in priv["hospitals"].items():
            lines.append(f"  {hid:>8}  {_num(rec['epsilon'], '.3f'):>8}  {_num(rec['delta'], 'g'):>8}  "
                         f"{rec['rounds_participated']:>6}  {rec['rounds_declined']:>8}")
        lines.append(f"  max ε = {_num(priv['max_epsilon'], '.3f')} at δ = {_num(priv['target_delta'], 'g')} "
                     "(each hospital's running total over every round it joined)")
    lines.append("")
    return lines


def _for_a_new_site(card: dict[str, Any]) -> list[str]:
    ad, rule, site = card["adaptation"], card.get("decision_rule") or {}, card.get("threshold")
    where = ad.get("chosen_on", "n/a")
    if ad.get("validation_hospitals"):
        where += f" {_hospital_list(ad['validation_hospitals'])}"
    lines = ["FOR A NEW SITE",
             f"  Adapt with {ad['method']}, lr {_num(ad['lr'], 'g')}, {ad['steps']} steps on "
             f"{_num(ad.get('shots_per_class'))} labelled records per class (chosen on: {where})"
             + (" -- 0 steps: use the weights as they are" if ad["steps"] == 0 else ""),
             f"  Decision rule: {rule.get('rule', 'argmax of softmax')}"
             + (f"; {rule['decision']}" if rule.get("decision") else "")]
    if site:
        extra = f", threshold {_num(site.get('threshold'), '.4g')}" if site.get("threshold") is not None else ""
        lines.append(f"  Site threshold recorded: rule {site.get('rule', 'n/a')}{extra}"
                     + (f" ({site['note']})" if site.get("note") else ""))
    else:
        lines.append("  No site threshold recorded yet (a site records its own when it adapts the model).")
    lines.append("")
    return lines


def _history(card: dict[str, Any]) -> list[str]:
    lines = ["HISTORY"]
    for i, step in enumerate(card.get("history", []), 1):
        details = ", ".join(f"{k} {v}" for k, v in step.items() if k not in ("step", "time", "weights_sha256"))
        sha = step.get("weights_sha256")
        lines.append(f"  {i}. {step.get('time', 'n/a')} {step.get('step', '?')}" + (f": {details}" if details else "")
                     + (f" -> weights {sha[:16]}..." if sha else ""))
    return lines


def _weights_and_code(card: dict[str, Any]) -> list[str]:
    weights, code = card["weights"], card.get("code") or {}
    return ["",
            f"WEIGHTS  SHA-256 {weights['sha256']} (verified), {weights['parameters']:,} parameters "
            f"in {weights['tensors']} tensors",
            f"CODE     {code.get('package', 'n/a')} {code.get('version') or 'version unknown'}, git "
            + (f"{code['git_commit']}{' (uncommitted changes)' if code.get('git_dirty') else ''}"
               if code.get("git_commit") else "commit unknown")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.model_info", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model file, e.g. <results-dir>/model.safetensors")
    parser.add_argument("--json", action="store_true", help="print the card as JSON")
    args = parser.parse_args(argv)

    from common.model_file import ModelFileError, load_model_file  # noqa: PLC0415 - torch: keep --help fast

    try:
        model = load_model_file(args.model)
    except (ModelFileError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        text = json.dumps(model.card, indent=2) if args.json else render(model.card, path=args.model)
    except (KeyError, TypeError, ValueError, IndexError) as err:  # verified weights, but a card edited by hand
        print(f"error: model file {args.model}: its card lacks or garbles an entry ({err!r}); the weights verify, "
              "but the description is incomplete. Use the model.safetensors the federation's server wrote, or "
              "read the raw card with --json.", file=sys.stderr)
        return 2
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # ε and δ on a terminal that cannot show them
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
