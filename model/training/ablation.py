"""The ablation: what the noise conditioning is worth, at equal steps and data, over seeds.

Variants (each trained from scratch on the same synthesised data, same steps, batch, patch and
schedule; scored on the validation cases of ``validation.py``, then each run's checkpoint on
the held-out families of ``families.py``, the test data that no decision looks at: PSNR and
SSIM in the mask, HFEN and the inserted lesions' kept contrast):

- ``ours``: the diffusion U-Net told the noise level by its timestep and by the noise map;
- ``t-fixed``: the same network with the timestep held at 600 (the map still given);
- ``no-map``: the same network with the timestep only (one noise figure per slice);
- ``blind``: the same network with neither (timestep fixed, no map);
- ``plain-unet-map``: MONAI BasicUNet without normalisation, the noise map as an input
  channel (DRUNet-style), about as many parameters.

``denoised-node evaluate --ablation --out-dir runs/ablation --steps 800 --seeds 1,2`` (or
``python -m denoised_node.model.training.ablation``) writes ``ablation.json`` and
``ablation.md``; a run already in the folder (trained, or scored) is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from denoised_node.model.hyperparameters import default_config
from denoised_node.model.network import build_network, count_parameters
from denoised_node.model.training.train import TrainConfig, setup_run_logging, train


def variants() -> dict[str, dict[str, Any]]:
    ours = default_config("diffusion_unet")
    return {
        "ours": ours,
        "t-fixed": {**ours, "fixed_timestep": 600},
        "no-map": {**ours, "noise_map_channel": False},
        "blind": {**ours, "noise_map_channel": False, "fixed_timestep": 600},
        "plain-unet-map": default_config("basic_unet"),
    }


def run(out_dir: Path, steps: int, seeds: list[int], batch_size: int, patch: int,
        threads: int, names: list[str] | None = None, device: str = "cpu") -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    chosen = {n: a for n, a in variants().items() if not names or n in names}
    # Seed-major: a run cut short still holds every variant at the first seed.
    for seed, (name, arch) in ((s, v) for s in seeds for v in chosen.items()):
        run_dir = out_dir / f"{name}-s{seed}"
        metrics_path = run_dir / "metrics.jsonl"
        if not (
            metrics_path.exists()
            and json.loads(metrics_path.read_text().splitlines()[-1])["step"] >= steps
        ):
            setup_run_logging(run_dir)
            cfg = TrainConfig(
                run_dir=run_dir,
                kind=arch["kind"],
                name=f"ablation-{name}",
                steps=steps,
                batch_size=batch_size,
                patch=patch,
                lr=1e-3,
                warmup=max(1, steps // 10),
                seed=seed,
                threads=threads,
                val_every=steps,
                arch=arch,
                device=device,
                command=f"python -m denoised_node.model.training.ablation (variant {name}, seed "
                        f"{seed})",
            )
            train(cfg, resume=(run_dir / "state.pt").exists())
        last = json.loads(metrics_path.read_text().splitlines()[-1])
        results.setdefault(name, {"parameters": count_parameters(build_network(arch)), "runs": []})
        results[name]["runs"].append({"seed": seed, **last,
                                      "families": _families(run_dir, threads, device)})
    results = {name: results[name] for name in chosen if name in results}
    results["noisy input"] = {"parameters": 0, "runs": [{"seed": 0,
                                                          "families": _noisy_families(out_dir)}]}
    (out_dir / "ablation.json").write_text(json.dumps(results, indent=1))
    (out_dir / "ablation.md").write_text(to_markdown(results, steps))
    return results


def _families(run_dir: Path, threads: int, device: str = "cpu") -> dict[str, float]:
    """The run's checkpoint on the held-out families (cached in the run's folder)."""
    cached = run_dir / "families.json"
    if cached.exists():
        return dict(json.loads(cached.read_text()))
    from denoised_node.model.inference import Denoiser
    from denoised_node.model.training.families import score_on_families

    # One plane and one pass for every variant: equal, and what a CPU node runs.
    model = Denoiser.load(run_dir / "best.safetensors", device=device, threads=threads, tta=1,
                          planes=1)
    scores = score_on_families({run_dir.name: model}, echo=logging.getLogger(__name__).info)
    cached.write_text(json.dumps(scores[run_dir.name], indent=1))
    return scores[run_dir.name]


class _Unchanged:
    """The reference row: the noisy input itself."""

    def denoise(self, volume: np.ndarray, spacing: Any = None) -> np.ndarray:
        return volume


def _noisy_families(out_dir: Path) -> dict[str, float]:
    cached = out_dir / "noisy-families.json"
    if cached.exists():
        return dict(json.loads(cached.read_text()))
    from denoised_node.model.training.families import score_on_families

    scores = score_on_families({"noisy": _Unchanged()}, echo=logging.getLogger(__name__).info)
    cached.write_text(json.dumps(scores["noisy"], indent=1))
    return scores["noisy"]


def to_markdown(results: dict[str, Any], steps: int) -> str:
    keys = sorted(
        {
            k
            for r in results.values()
            for run in r["runs"]
            for k in run
            if k.startswith("psnr_mask_")
        },
        key=lambda k: (k != "psnr_mask_mean", k),
    )
    head = (
        "| variant | parameters | " + " | ".join(k.removeprefix("psnr_mask_") for k in keys) + " |"
    )
    lines = [f"Validation PSNR in the mask (dB), mean ± spread over seeds, {steps} steps each.", "",
             head, "|---|---|" + "---|" * len(keys)]
    for name, r in results.items():
        if not r["parameters"]:
            continue  # the noisy input has no validation row
        cells = []
        for k in keys:
            vals = np.array([run[k] for run in r["runs"] if k in run], dtype=float)
            cells.append(f"{vals.mean():.2f} ± {vals.std():.2f}" if len(vals) else "")
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f} M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _families_markdown(results)


def _families_markdown(results: dict[str, Any]) -> str:
    keys = ["psnr_mask", "ssim_mask", "hfen", "lesion_contrast"]
    families = sorted({k for r in results.values() for run in r["runs"]
                       for k in run.get("families", {}) if k.startswith("psnr_")} - {"psnr_mask"})
    lines = [("Held-out families (test data), mean over every case, ± spread over seeds "
              "(HFEN: lower is better; lesion contrast: 1 keeps all of it)."), "",
             "| variant | PSNR | SSIM | HFEN | lesion contrast | "
             + " | ".join(f.removeprefix("psnr_") for f in families) + " |",
             "|---|---|---|---|---|" + "---|" * len(families)]
    for name, r in results.items():
        cells = []
        for k in keys + families:
            vals = np.array([run["families"][k] for run in r["runs"]
                             if k in run.get("families", {})], dtype=float)
            digits = 2 if k.startswith("psnr") else 3
            cells.append(f"{vals.mean():.{digits}f} ± {vals.std():.{digits}f}" if len(vals) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--variants", default="", help="comma-separated subset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    res = run(args.out_dir, args.steps, [int(s) for s in args.seeds.split(",")], args.batch_size,
              args.patch, args.threads, [v for v in args.variants.split(",") if v] or None,
              device=args.device)
    print(to_markdown(res, args.steps))


if __name__ == "__main__":
    main()
