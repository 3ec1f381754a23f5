"""The main job: train the AV-digits reference model with and without OGM-GE, print the comparison, plot it.

``python -m reference_models.demo [--epochs N] [--seed S] [--out DIR]`` (``make demo``). Both runs share the
data, the initialisation and every hyper-parameter; only the gradient modulation differs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from reference_models.plots import plot_comparison
from reference_models.train import TrainConfig, train

RUNS = {"baseline": {"method": "baseline"}, "OGM-GE": {"method": "ogm_ge"}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_models.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the dataset default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.8, help="OGM-GE α")
    parser.add_argument("--out", default="results/demo", help="output folder (JSON, PNG)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = {}
    for name, options in RUNS.items():
        print(f"== {name} ==", flush=True)
        config = TrainConfig(dataset="avdigits", epochs=args.epochs, seed=args.seed, alpha=args.alpha, out=str(out / options["method"]), **options)
        results[name] = train(config)

    modalities = list(results["baseline"]["final"]["unimodal"])
    header = f"{'method':<10} {'fused acc':>9} " + " ".join(f"{m + ' alone':>13}" for m in modalities)
    header += " " + " ".join(f"{'mean k ' + m:>14}" for m in modalities) + f" {'time (s)':>9}"
    print("\nAV-digits test accuracy (unimodal = the fused head with the other modality's features zeroed)")
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        final = result["final"]
        ks = [r["coefficients"] for r in result["coefficients_per_step"]]
        mean_k = [sum(k[m] for k in ks) / len(ks) if ks else 1.0 for m in modalities]
        line = f"{name:<10} {final['accuracy']:>9.3f} " + " ".join(f"{final['unimodal'][m]:>13.3f}" for m in modalities)
        line += " " + " ".join(f"{k:>14.3f}" for k in mean_k) + f" {result['wall_time_s']:>9.1f}"
        print(line)
    plot_comparison(results, out / "comparison.png")
    summary = {name: {"final": r["final"], "wall_time_s": r["wall_time_s"]} for name, r in results.items()}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'comparison.png'} and {out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
