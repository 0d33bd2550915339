"""``denoised-node train`` and ``denoised-node evaluate``: the model's CLI commands."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from denoised_node.config.settings import PLANE_CHOICES, SHIPPED_CHECKPOINT, TTA_CHOICES
from denoised_node.daemon.cli.extras import require
from denoised_node.daemon.cli.options import CommandError, ExitCode
from denoised_node.daemon.cli.progress_bar import progress_bar
from denoised_node.model.hyperparameters import HYPERPARAMETERS, KINDS, LOSS_WEIGHTINGS, TRAINING


def _load_config(path: str | None) -> object | None:
    if path is None:
        return None
    from denoised_node.config.settings import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        raise CommandError(str(exc), ExitCode.USAGE) from None


def _command_line(name: str) -> str:
    args = sys.argv[1:]
    if name in args:
        args = args[args.index(name) + 1 :]
    return shlex.join(["denoised-node", name, *args])


@click.command("train")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Node config (TOML).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of a new run (logs, checkpoints).")
@click.option("--kind", type=click.Choice(KINDS), default=HYPERPARAMETERS.kind, show_default=True)
@click.option("--name", default=None,
              help="Model name in the card (default: unet25d, or basic-unet25d).")
@click.option("--volume", "volumes", multiple=True,
              help="Clean NIfTI file, DICOM folder or named source (mni152-t1, mni152-scalp, "
                   "inia19-macaque); default: the three named sources.")
@click.option("--pair", "pairs", nargs=2, multiple=True, metavar="NOISY CLEAN",
              help="Train on a real noisy/clean pair (NIfTI files or DICOM folders) instead of "
                   "simulated noise.")
@click.option("--steps", type=int, default=None,
              help="Optimiser steps (default 5000 without --time-budget).")
@click.option("--time-budget", "time_budget", type=float, default=None, metavar="MINUTES",
              help="Train for this much wall-clock time; the learning-rate schedule follows it.")
@click.option("--batch-size", type=int, default=TRAINING.batch_size, show_default=True)
@click.option("--patch", type=int, default=HYPERPARAMETERS.patch, show_default=True)
@click.option("--lr", type=float, default=TRAINING.lr, show_default=True)
@click.option("--seed", type=int, default=TRAINING.seed, show_default=True)
@click.option("--threads", type=int, default=TRAINING.threads, show_default=True,
              help="torch CPU threads.")
@click.option("--device", default="auto", show_default=True)
@click.option("--val-every", type=int, default=TRAINING.val_every, show_default=True)
@click.option("--holdout", type=int, default=TRAINING.holdout, show_default=True,
              help="Central test slab never trained on (slices).")
@click.option("--gap", type=int, default=TRAINING.gap, show_default=True,
              help="Slices either side of the slab, also never trained on.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              metavar="RUN_DIR",
              help="Continue this run from its last state, with its own config and schedule "
                   "(only --threads and --device may change).")
@click.option("--loss-weighting", type=click.Choice(LOSS_WEIGHTINGS), default=LOSS_WEIGHTINGS[0],
              show_default=True,
              help="Each sample's squared error over its noisy input's own (relative), "
                   "over its sigma^2 (inverse_variance), or plain MSE.")
@click.option("--precision", type=click.Choice(["auto", "fp32"]), default="auto",
              show_default=True,
              help="auto: bf16 autocast where the GPU or CPU has native bf16 (fp32 master "
                   "weights).")
@click.option("--init-from", default=None, metavar="CHECKPOINT",
              help="Fine-tune: start from these weights ('default' = the shipped model) with a "
                   "fresh schedule.")
@click.option("--warmup", type=int, default=TRAINING.warmup, show_default=True,
              help="Warm-up steps before the cosine decay.")
@click.option("--evaluate", "then_evaluate", is_flag=True,
              help="Then evaluate the best checkpoint on the held-out families beside the shipped "
                   "model (RUN-DIR/eval).")
def train_command(config_path: str | None, run_dir: str, kind: str, name: str | None,
                  volumes: tuple[str, ...], pairs: tuple[tuple[str, str], ...],
                  steps: int | None, time_budget: float | None, batch_size: int, patch: int,
                  lr: float, seed: int, threads: int, device: str, val_every: int, holdout: int,
                  gap: int, resume_dir: str | None, loss_weighting: str, precision: str,
                  init_from: str | None, warmup: int, then_evaluate: bool) -> None:
    """Train the denoiser (or the plain U-Net baseline) on simulated Rician noise."""
    require("train")  # now, not after minutes of work
    _load_config(config_path)
    from denoised_node.daemon.process.logs import use_node_format
    from denoised_node.model.errors import ModelError
    from denoised_node.model.training.train import (
        DEFAULT_VOLUMES,
        TrainConfig,
        load_run_config,
        setup_run_logging,
        train,
    )

    if (run_dir is None) == (resume_dir is None):
        raise CommandError("give --run-dir for a new run, or --resume RUN_DIR to continue one",
                           ExitCode.USAGE)
    if resume_dir is not None:
        try:
            cfg = load_run_config(Path(resume_dir))
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        ctx = click.get_current_context()
        changed = [p for p in ("kind", "name", "volumes", "pairs", "steps", "time_budget",
                               "batch_size", "patch", "lr", "seed", "val_every", "holdout", "gap",
                               "init_from", "warmup", "precision", "loss_weighting")
                   if ctx.get_parameter_source(p) != click.core.ParameterSource.DEFAULT]
        if changed:
            option = "--" + changed[0].replace("_", "-")
            raise CommandError(f"--resume continues the run's own schedule; leave out {option}",
                               ExitCode.USAGE)
        cfg.threads, cfg.device = threads, device
        cfg.command = _command_line("train")
    run = Path(resume_dir or run_dir)
    setup_run_logging(run)
    use_node_format()  # one log format for every process, training included
    if resume_dir is None:
        cfg = TrainConfig(
            run_dir=run, kind=kind,
            name=name or ("unet25d" if kind == "diffusion_unet" else "basic-unet25d"),
            volumes=list(volumes) or list(DEFAULT_VOLUMES),
            pairs=[(noisy, clean) for noisy, clean in pairs],
            steps=steps if steps is not None or time_budget is not None else 5000,
            time_budget_s=None if time_budget is None else 60.0 * time_budget,
            batch_size=batch_size, patch=patch, lr=lr, seed=seed,
            threads=threads, device=device, val_every=val_every, holdout=holdout, gap=gap,
            command=_command_line("train"), init_from=init_from, warmup=warmup,
            amp=precision == "auto",
            loss_weighting=loss_weighting,
        )
    resume = resume_dir is not None
    try:
        with progress_bar("train", "step" if cfg.steps else "s") as bar:
            best = train(cfg, resume=resume, progress=bar.progress)
    except (FileExistsError, FileNotFoundError, ValueError, ModelError) as exc:
        raise CommandError(str(exc)) from None
    click.echo(f"best checkpoint: {best}")
    if then_evaluate:
        from denoised_node.config.settings import GateSettings
        from denoised_node.model.training.evaluate import EvalConfig, evaluate_families_cli

        with progress_bar("evaluate", "case") as bar:
            evaluate_families_cli(EvalConfig(checkpoint=str(best), out_dir=run / "eval",
                                             device=device, threads=threads, holdout=holdout,
                                             gap=gap),
                                  GateSettings(), SHIPPED_CHECKPOINT, echo=bar.echo,
                                  progress=bar.progress)
        click.echo(f"evaluation: {run / 'eval' / 'families.md'}")



def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) / 100.0 for x in text.split(",") if x.strip())


@click.command("evaluate")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Node config (TOML).")
@click.option("--checkpoint", default=None,
              help="Model to evaluate (default: [model] checkpoint, else the shipped one).")
@click.option("--baseline", default="baseline-unet", show_default=True,
              help="Plain U-Net checkpoint (name or path); 'none' to leave it out.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="eval", show_default=True)
@click.option("--levels", default="1,3,5,7,9", show_default=True,
              help="Rician noise, % of the max.")
@click.option("--seeds", type=int, default=3, show_default=True)
@click.option("--methods", default="noisy,nlm,bm4d,baseline,ours", show_default=True)
@click.option("--contrasts", default="t1,t2like", show_default=True)
@click.option("--device", default=None,
              help="auto | cpu | cuda | cuda:N (default: [model] device).")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
@click.option("--tta", type=click.Choice([str(n) for n in TTA_CHOICES]), default=None,
              help="Averaged passes per slice for the networks (default: 1 on a CPU, 8 on a GPU).")
@click.option("--planes", type=click.Choice([str(n) for n in PLANE_CHOICES]), default=None,
              help="Planes averaged for the networks (default: 2 on a CPU, 3 on a GPU).")
@click.option("--holdout", type=int, default=TRAINING.holdout, show_default=True,
              help="Test slab (slices), as in training.")
@click.option("--gap", type=int, default=TRAINING.gap, show_default=True,
              help="Gap either side of the slab, as in training.")
@click.option("--families", is_flag=True,
              help="Evaluate on the held-out families (thick slices, noise kinds, lesions, "
                   "texture, a real EPI) and study the gate.")
@click.option("--compare", default="unet25d-1.0", show_default=True,
              help="With --families: the previous model to show beside ('none' to leave it out).")
@click.option("--ablation", is_flag=True,
              help="Train the ablation's variants from scratch at equal steps (or reuse those in "
                   "--out-dir) and score them on validation and the held-out families.")
@click.option("--ablation-steps", type=int, default=800, show_default=True)
@click.option("--ablation-seeds", default="1,2", show_default=True)
@click.option("--variants", default="ours,t-fixed,plain-unet-map", show_default=True,
              help="Ablation variants (ours, t-fixed, no-map, blind, plain-unet-map).")
@click.option("--bm4d", "with_bm4d", is_flag=True,
              help="With --families: BM4D (true sigma) and BM4D with the clean volume as its "
                   "pilot (the ceiling) too.")
@click.option("--noise-map-factors", default="", metavar="F,F,...",
              help="With --validation: score once per factor on the noise map's reading "
                   "(choosing it on validation).")
@click.option("--validation", "on_validation", is_flag=True,
              help="Score --checkpoint on the training recipe's validation domains, as a run "
                   "scores its own.")
@click.option("--noise-floor", "noise_floor", is_flag=True,
              help="Measure --checkpoint's noise floor on the validation domains (the card's "
                   "noise_floor_percent).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON instead of Markdown.")
def evaluate_command(config_path: str | None, checkpoint: str | None, baseline: str,
                     out_dir: str, levels: str, seeds: int, methods: str, contrasts: str,
                     device: str | None, threads: int, tta: str | None, planes: str | None,
                     holdout: int, gap: int, families: bool, compare: str, ablation: bool,
                     ablation_steps: int, ablation_seeds: str, variants: str, with_bm4d: bool,
                     noise_map_factors: str, on_validation: bool, noise_floor: bool,
                     as_json: bool) -> None:
    """Benchmark on held-out data: noisy, NLM, BM4D, plain U-Net, ours (Markdown + JSON + PNG);
    or the held-out families (--families), or the ablation (--ablation), or the validation
    domains (--validation), or the noise floor (--noise-floor)."""
    import json

    require("train")  # now, not after minutes of work

    if noise_floor:
        import torch

        from denoised_node.model.training.noise_floor_study import floor_from_cases, measure_cases
        from denoised_node.model.training.noise_floor_study import report as floor_report

        if threads:
            torch.set_num_threads(threads)
        try:
            cases = measure_cases(checkpoint or SHIPPED_CHECKPOINT, device=device or "cpu")
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        if as_json:
            click.echo(json.dumps({"noise_floor_percent": floor_from_cases(cases),
                                   "cases": [c.as_json() for c in cases]}, indent=1))
        else:
            click.echo(floor_report(cases))
        return

    if on_validation:
        import torch

        from denoised_node.model.training.validation import validate_checkpoint

        if threads:
            torch.set_num_threads(threads)
        try:
            factors = tuple(float(f) for f in noise_map_factors.split(",") if f.strip())
            scores = validate_checkpoint(checkpoint or SHIPPED_CHECKPOINT, device=device or "cpu",
                                         noise_map_factors=factors)
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        if as_json:
            click.echo(json.dumps(scores, indent=1))
        else:
            for key, value in scores.items():
                prefix, _, name = key.rpartition("/")
                if name.startswith("psnr_mask_") and ":" not in name:
                    label = f"{prefix} {name[len('psnr_mask_'):]}".strip()
                    click.echo(f"{label:<22} {value:7.3f} dB")
        return

    if ablation:
        from denoised_node.model.training.ablation import run as run_ablation
        from denoised_node.model.training.ablation import to_markdown as ablation_markdown

        result = run_ablation(Path(out_dir), ablation_steps,
                              [int(s) for s in ablation_seeds.split(",") if s.strip()],
                              batch_size=8, patch=64, threads=max(1, threads),
                              names=[v.strip() for v in variants.split(",") if v.strip()],
                              device=device or "cpu")
        click.echo(json.dumps(result, indent=1) if as_json
                   else ablation_markdown(result, ablation_steps))
        click.echo(f"wrote {Path(out_dir) / 'ablation.md'} and ablation.json", err=True)
        return

    from denoised_node.model.errors import ModelError
    from denoised_node.model.training.evaluate import EvalConfig, evaluate, to_markdown

    settings = _load_config(config_path)
    model_settings = getattr(settings, "model", None)
    cfg = EvalConfig(
        checkpoint=checkpoint or (model_settings.checkpoint if model_settings
                                  else SHIPPED_CHECKPOINT),
        baseline=None if baseline.lower() == "none" else baseline,
        levels=_floats(levels),
        seeds=tuple(range(seeds)),
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        contrasts=tuple(c.strip() for c in contrasts.split(",") if c.strip()),
        out_dir=Path(out_dir),
        device=device or (model_settings.device if model_settings else "auto"),
        threads=threads,
        tta=int(tta) if tta else None,
        planes=int(planes) if planes else None,
        holdout=holdout,
        gap=gap,
        extra={"bm4d": with_bm4d},
    )
    if families:
        from denoised_node.config.settings import GateSettings
        from denoised_node.model.training.evaluate import evaluate_families_cli
        from denoised_node.model.training.families import families_markdown

        gate = getattr(settings, "gate", None) or GateSettings()
        try:
            with progress_bar("families", "case") as bar:
                fam = evaluate_families_cli(cfg, gate,
                                            None if compare.lower() == "none" else compare,
                                            echo=bar.echo, progress=bar.progress)
        except ModelError as exc:
            raise CommandError(str(exc)) from None
        if as_json:
            click.echo(json.dumps(fam, indent=1, default=float))
        else:
            shown = [m for m in ("previous", "ours")
                     if any(r["method"] == m for r in fam["rows"])]
            click.echo(families_markdown(fam, shown))
        click.echo(f"wrote {Path(out_dir) / 'families.md'} and families.json", err=True)
        return
    try:
        with progress_bar("evaluate", "result") as bar:
            result = evaluate(cfg, echo=bar.echo, progress=bar.progress)
    except ModelError as exc:
        raise CommandError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result["summary"], indent=1))
    else:
        methods_shown = tuple(dict.fromkeys(s["method"] for s in result["summary"]))
        click.echo(to_markdown(result["summary"], methods_shown))
    click.echo(f"wrote {Path(out_dir) / 'results.md'}, results.json and figure.png", err=True)

if __name__ == "__main__":  # python -m denoised_node.daemon.cli.model_commands train ...
    @click.group()
    def _main() -> None:
        """The model commands on their own."""

    _main.add_command(train_command)
    _main.add_command(evaluate_command)
    _main()
