"""How well each ablation variant fits its training records: a stage's loss terms at the end of training.

Where an arm with more parameters scores no better, this says whether it fitted its records any
better either: if it did not, its extra capacity had nothing to learn (claim (b), README Results).
Reads the histories `bench/ablation.py --workdir DIR` kept, mean of the last ``--last`` logged rows
(each row is ``log_every`` steps), then mean ± std over seeds:

    python bench/training_fit.py .cache/ablation_q05 --stage mimic_sparse --variants llava_mod dense_same_active
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def fit(history: list[dict], terms: list[str], last: int) -> dict[str, float]:
    """Each loss term's mean over the last ``last`` rows; a term the stage did not log is left out."""
    tail = history[-last:]
    return {term: statistics.fmean(row[term] for row in tail) for term in terms if term in tail[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="an ablation --workdir: one <variant>-seed<N> folder per run")
    parser.add_argument("--stage", default="mimic_sparse", help="the training stage whose history to read (default mimic_sparse)")
    parser.add_argument("--variants", nargs="+", required=True, help="bench/ablation.py variant names, e.g. llava_mod dense_same_active")
    parser.add_argument("--terms", nargs="+", default=["ce", "kl_response"], help="logged loss terms (default: ce kl_response)")
    parser.add_argument("--last", type=int, default=10, help="logged rows to average (default 10)")
    args = parser.parse_args()

    print(f"| variant | seeds | {' | '.join(args.terms)} |")
    print("|---|---|" + "---:|" * len(args.terms))
    for variant in args.variants:
        runs = sorted(args.workdir.glob(f"{variant}-seed*/metrics/history/{args.stage}.json"))
        if not runs:
            raise SystemExit(f"{args.workdir}: no {variant}-seed*/metrics/history/{args.stage}.json; run bench/ablation.py --workdir {args.workdir} --variants {variant}")
        fits = [fit(json.loads(path.read_text()), args.terms, args.last) for path in runs]
        seeds = ", ".join(path.parts[-4].rsplit("-seed", 1)[1] for path in runs)
        cells = []
        for term in args.terms:
            values = [f[term] for f in fits if term in f]
            spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.4f}{spread}" if values else "-")
        print(f"| {variant} | {seeds} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
