"""The ``cropbench`` command line (click)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from cropbench.errors import CropbenchError
from cropbench.recipe import SCALES, Recipe, list_entries, load_entry, parse_overrides
from cropbench.registry import BACKBONES, DATASETS, EVALUATIONS, METHODS

if TYPE_CHECKING:
    from cropbench.launch import SlurmOptions
    from cropbench.runner import EvalSpec, RunSpec

RESULTS = Path(__file__).resolve().parent.parent / "results"
KINDS = {
    "entries": None,
    "methods": METHODS,
    "generators": None,  # view generators (cropbench.views.generators; imported when listed)
    "evals": EVALUATIONS,
    "datasets": DATASETS,
    "backbones": BACKBONES,
}


class UserError(click.ClickException):
    """A CropbenchError shown as ``Error: ...`` with exit status 2 and no traceback."""

    exit_code = 2


def _close_progress_bars() -> None:
    """Close (and clear) any open tqdm bar, so a message after it starts on a fresh line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CropbenchError as e:
            _close_progress_bars()
            raise UserError(str(e)) from e
        except Exception:
            _close_progress_bars()
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cropbench")
def cli() -> None:
    """cropbench: reproducible benchmarks of view construction in contrastive SSL."""


@cli.command("list")
@click.argument("kind", type=click.Choice(list(KINDS)), default="entries")
def list_cmd(kind: str) -> None:
    """List entries, methods, view generators, evaluations, datasets or backbones (from the registries)."""
    if kind == "entries":
        for name in list_entries():
            e = load_entry(name)
            variants = "" if list(e.variants) == ["default"] else f" [variants: {', '.join(e.variants)}]"
            click.echo(f"{name:<12} {e.modality:<6} {e.paper.title}{variants}")
        return
    reg = KINDS[kind]
    if kind == "generators":
        from cropbench.views.generators import VIEW_GENERATORS

        reg = VIEW_GENERATORS
    if kind == "datasets":  # each dataset's exact on-disk layout (cropbench.data.describe)
        from cropbench.data import describe

        click.echo("\n\n".join(describe(reg.get(name)) for name in reg.names()))
        return
    for name in reg.names():
        obj = reg.get(name)
        desc = getattr(obj, "description", "") or (obj.__doc__ or "").strip().splitlines()[0:1]
        desc = desc if isinstance(desc, str) else (desc[0] if desc else "")
        click.echo(f"{name:<20} {desc}")


def _generator_name(r: Recipe) -> str:
    """The view generator the recipe names in ``params.views`` (every entry names one)."""
    views = r.params.get("views")
    name = views.get("generator") if isinstance(views, dict) else None
    return name if isinstance(name, str) else "(the method's default)"


def _recipe_summary(r: Recipe) -> str:
    """One line: what is trained, on what, for how long."""
    o, t, d = r.optim, r.train, r.data
    return (
        f"{r.method} on {r.backbone}, {d.dataset} at {d.image_size} px, {t.epochs} epochs, batch {t.batch_size}, "
        f"{o.name} lr {o.lr:g} @ {o.base_batch}; views {_generator_name(r)}; {len(r.deviations)} deviations"
    )


@cli.command()
@click.argument("entry")
@click.option("--full", is_flag=True, help="Print every resolved recipe in full (long).")
def show(entry: str, full: bool) -> None:
    """Paper, variants, recipe per scale, references and claims of ENTRY (a summary; --full for all)."""
    e = load_entry(entry)
    code = e.paper.code or "(none released)"
    click.echo(f"{e.name}: {e.paper.title}\n  arXiv {e.paper.arxiv}  {e.paper.venue}  code: {code}")
    click.echo(f"  {' '.join(e.description.split())}")
    click.echo(f"  modality: {e.modality}; evaluations: {', '.join(e.evaluations)}")
    for v, var in e.variants.items():
        click.echo(f"\nvariant {v}: {' '.join(var.description.split())}")
        for scale in SCALES:
            r = e.recipe(v, scale)
            click.echo(f"  [{scale}] recipe {r.hash()}: {_recipe_summary(r)}")
            if full:
                presets = e.eval_presets(v, scale)  # the named protocols its eval settings start from
                if presets:
                    click.echo("    eval presets: " + ", ".join(f"{k}={p}" for k, p in presets.items()))
                body = yaml.safe_dump(r.to_dict(), sort_keys=False, default_flow_style=None, width=100)
                click.echo("\n".join("    " + line for line in body.splitlines()))
    if e.references:
        click.echo("\nreferences:")
        for ref in e.references:
            note = f" {ref.note}" if ref.note else ""
            key = f"{ref.variant}/{ref.scale}/{ref.eval}/{ref.metric}"
            click.echo(f"  {key} = {ref.value} ±{ref.tolerance}  ({ref.source}){note}")
    if e.related:
        click.echo("\nrelated (other methods' numbers, for context only; never checked):")
        for rel in e.related:
            click.echo(f"  {rel.method}: {rel.scale}/{rel.eval}/{rel.metric} = {rel.value}  ({rel.source})")
    if e.claims:
        click.echo("\nclaims:")
        for c in e.claims:
            click.echo(
                f"  {c.text}  [{c.variant} vs {c.baseline} on {c.eval}/{c.metric} by >= {c.min_delta}, {c.scale}]"
            )
    if not full:
        click.echo(f"\n(resolved recipes, deviations and evaluation settings: cropbench show {entry} --full)")


_LAUNCH_OPTIONS = [
    click.option(
        "--launcher",
        type=click.Choice(["local", "slurm", "submitit-local"]),
        default="local",
        show_default=True,
        help="local: run here (joins a torchrun / srun launch found in the environment); slurm: submit "
        "this run through submitit and return; submitit-local: the same on this machine (tests).",
    ),
    click.option("--partition", default=None, help="Slurm partition (--launcher slurm)."),
    click.option("--nodes", default=None, type=click.IntRange(1), help="Slurm nodes (default 1)."),
    click.option(
        "--gpus-per-node",
        default=None,
        type=click.IntRange(0),
        help="GPUs per node, one process each (default 1; 0 for CPU jobs, processes from --nproc).",
    ),
    click.option("--time", "time_min", default=None, type=click.IntRange(1), help="Time limit, minutes (default 60)."),
    click.option("--cpus-per-task", default=None, type=click.IntRange(1), help="CPUs per process (Slurm default)."),
    click.option(
        "--slurm-log-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Where submitit writes job logs (default <work-dir>/slurm).",
    ),
]


def launch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--launcher`` options shared by ``run`` and ``eval``."""
    for option in reversed(_LAUNCH_OPTIONS):
        fn = option(fn)
    return fn


def slurm_options(launch: dict[str, Any], nproc: int, work_dir: Path) -> SlurmOptions | None:
    """``SlurmOptions`` from the CLI's launcher options; None for ``--launcher local`` (where a
    Slurm-only option is an error: it would be silently ignored)."""
    from cropbench.launch import SlurmOptions

    given = {k: v for k, v in launch.items() if k != "launcher" and v is not None}
    if launch["launcher"] == "local":
        if given:
            flag = "--" + next(iter(given)).replace("_min", "").replace("_", "-")
            raise CropbenchError(f"{flag} applies only with --launcher slurm (or submitit-local)")
        return None
    gpus = 1 if launch["gpus_per_node"] is None else launch["gpus_per_node"]
    return SlurmOptions(
        launch["launcher"],
        Path(launch["slurm_log_dir"] or Path(work_dir) / "slurm").absolute(),
        launch["partition"],
        launch["nodes"] or 1,
        nproc if gpus == 0 else (gpus if nproc == 1 else nproc),
        gpus,
        launch["time_min"] or 60,
        launch["cpus_per_task"],
    )


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).absolute()


def submit_and_say(fn: Callable[..., Any], spec: Any, opts: SlurmOptions, name: str, records: list[Path]) -> None:
    """Submit ``fn(spec)`` and print the job id, its log and where its records go; never waits."""
    from cropbench.launch import submit

    job = submit(fn, (spec,), opts, name)
    where = "Slurm" if opts.launcher == "slurm" else "submitit-local"
    click.echo(f"submitted {where} job {job.job_id}: {opts.nodes} node(s) x {opts.tasks_per_node} process(es)")
    click.echo(f"  log:     {job.stdout}  (stderr {job.stderr.name}; one pair per process)")
    for path in records:
        click.echo(f"  record:  {path}")


@cli.command()
@click.argument("entry")
@click.option("--variant", default=None, help="Variant name (default: the entry's first).")
@click.option(
    "--eval", "evals", multiple=True, help="Evaluation(s) to run (repeatable; default: all the entry supports)."
)
@click.option("--scale", type=click.Choice(SCALES), default="micro", show_default=True)
@click.option("--seed", "seeds", multiple=True, type=int, help="Seed(s) (repeatable; default 0).")
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset root (default $CROPBENCH_DATA; micro generates embedded data).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Data-parallel processes (torch.distributed; gloo on CPU, NCCL on GPU).",
)
@click.option(
    "--resume",
    type=click.Choice(["auto", "strict"]),
    is_flag=False,
    flag_value="auto",
    default=None,
    help="Continue from this run's checkpoint. Plain --resume starts from scratch (and says so) "
    "when there is none; --resume=strict refuses instead.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=RESULTS / "records", show_default=True, help="Records root."
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Checkpoints, logs and feature caches.",
)
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe override, e.g. --set train.epochs=2 (repeatable)."
)
@click.option("--split", default=None, help="Video evaluations: split 1|2|3|all (sets eval.<name>.split).")
@click.option(
    "--random-init/--no-random-init", default=False, help="Also evaluate the same encoder at its random initialisation."
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile the backbone and heads (sets train.compile=true; a speed setting: "
    "records are not marked modified and --resume accepts it).",
)
@click.option(
    "--trace-epochs",
    type=click.IntRange(1),
    default=None,
    metavar="K",
    help="Pretrain only the first K epochs of the recipe's schedule (same lr and schedules as the "
    "whole run) and write a 'trace' record of epoch K's mean loss; no evaluations. CI's check for "
    "golden jobs it does not re-run whole (results/golden/traces).",
)
@click.option("--quiet", is_flag=True)
@launch_options
def run(
    entry: str,
    variant: str | None,
    evals: tuple[str, ...],
    scale: str,
    seeds: tuple[int, ...],
    data_root: Path | None,
    device: str,
    nproc: int,
    resume: str | None,
    out: Path,
    work_dir: Path,
    sets: tuple[str, ...],
    split: str | None,
    random_init: bool,
    compile_: bool,
    trace_epochs: int | None,
    quiet: bool,
    **launch: Any,
) -> None:
    """Pretrain ENTRY, evaluate it, write records and print a result table.

    Under torchrun or srun (RANK / WORLD_SIZE, or an srun step, in the environment) every process
    runs this same command and joins the launch; rank 0 alone writes and prints."""
    from cropbench.runner import RunSpec
    from cropbench.runner import run as run_entry
    from cropbench.tables import run_table

    e = load_entry(entry)
    overrides = parse_overrides(sets)
    if compile_:
        overrides.setdefault("train", {})["compile"] = True
    if split is not None:
        for name in evals or e.evaluations:
            overrides.setdefault("eval", {}).setdefault(name, {})["split"] = split
    spec = RunSpec(
        entry,
        variant or e.variant_names()[0],
        scale,
        tuple(evals),
        tuple(seeds) or (0,),
        data_root,
        device,
        nproc,
        resume is not None,
        out,
        work_dir,
        overrides,
        random_init,
        quiet,
        resume_strict=resume == "strict",
        trace_epochs=trace_epochs,
    )
    opts = slurm_options(launch, nproc, work_dir)
    if opts is not None:
        submit_run(spec, opts)
        return
    records = run_entry(spec)
    if records is not None:  # None: a process other than rank 0 of a distributed launch
        click.echo(run_table(records))


def submit_run(spec: RunSpec, opts: SlurmOptions) -> None:
    """``run --launcher slurm``: check here, then submit the same run with absolute paths."""
    from dataclasses import replace

    from cropbench.records import Record, record_path
    from cropbench.runner import RANDOM_INIT, TRACE, command_line, preflight_run, resolve_data_root
    from cropbench.runner import run as run_entry

    opts.check()  # cheap checks (submitit installed, sbatch at hand) before the preflight
    evals, _ = preflight_run(spec)
    root = resolve_data_root(spec).absolute()
    cmd = command_line()
    spec = replace(
        spec, data_root=root, out=_absolute(spec.out), work_dir=_absolute(spec.work_dir), nproc=1, command=cmd
    )
    variants = [spec.variant] + ([spec.variant + RANDOM_INIT] if spec.random_init else [])
    names = (TRACE,) if spec.trace_epochs else evals  # a trace writes one record per seed
    paths = [
        record_path(spec.out, Record(spec.entry, v, spec.scale, name, seed, {}, {}, 0.0, {}))
        for seed in spec.seeds
        for name in names
        for v in variants
    ]
    submit_and_say(run_entry, spec, opts, f"cropbench-{spec.entry}", paths)


@cli.command("eval")
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("--entry", required=True, help="Entry whose evaluation protocols (and backbone) to use.")
@click.option("--variant", default=None, help="Variant name (default: the entry's first).")
@click.option(
    "--eval", "evals", multiple=True, help="Evaluation(s) to run (repeatable; default: all the entry supports)."
)
@click.option("--scale", type=click.Choice(SCALES), default="micro", show_default=True)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    help="Release format of WEIGHTS (auto: recognised by its keys), e.g. mocov2, simsiam, openselfsup, "
    "videomoco, torchvision, timm, detectron2, cropbench (cropbench.weights.format_names()).",
)
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset root (as for run).")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Evaluation setting, e.g. eval.knn.k=20 (repeatable)."
)
@click.option("--seed", default=None, type=int, help="Evaluation seed (default: a cropbench checkpoint's, else 0).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Processes (torch.distributed): fine-tuning evaluations train data-parallel.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=RESULTS / "records", show_default=True, help="Records root."
)
@click.option(
    "--work-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True, help="Feature caches."
)
@click.option("--quiet", is_flag=True)
@launch_options
def eval_cmd(
    weights: Path,
    entry: str,
    variant: str | None,
    evals: tuple[str, ...],
    scale: str,
    fmt: str,
    data_root: Path | None,
    sets: tuple[str, ...],
    seed: int | None,
    device: str,
    nproc: int,
    out: Path,
    work_dir: Path,
    quiet: bool,
    **launch: Any,
) -> None:
    """Evaluate WEIGHTS (a cropbench checkpoint.pt or a paper's released checkpoint) under ENTRY's
    evaluation protocols, without pretraining; records say where the weights came from."""
    from cropbench.runner import EvalSpec, evaluate_weights
    from cropbench.tables import run_table

    e = load_entry(entry)
    spec = EvalSpec(
        weights,
        entry,
        variant or e.variant_names()[0],
        scale,
        tuple(evals),
        seed,
        data_root,
        device,
        nproc,
        fmt,
        out,
        work_dir,
        parse_overrides(sets),
        quiet,
    )
    opts = slurm_options(launch, nproc, work_dir)
    if opts is not None:
        submit_eval(spec, opts)
        return
    records = evaluate_weights(spec)
    if records is not None:  # None: a process other than rank 0 of a distributed launch
        click.echo(run_table(records))


def submit_eval(spec: EvalSpec, opts: SlurmOptions) -> None:
    """``eval --launcher slurm``: check here (weights included), then submit with absolute paths."""
    from dataclasses import replace

    from cropbench.records import Record, record_path
    from cropbench.runner import command_line, evaluate_weights, preflight_eval_spec

    opts.check()
    plan, root = preflight_eval_spec(spec)
    cmd = command_line()
    spec = replace(
        spec,
        weights=_absolute(spec.weights),
        data_root=root.absolute(),
        out=_absolute(spec.out),
        work_dir=_absolute(spec.work_dir),
        nproc=1,
        command=cmd,
    )
    paths = [
        record_path(spec.out, Record(spec.entry, spec.variant, spec.scale, name, plan.seed, {}, {}, 0.0, {}))
        for name in plan.settings
    ]
    submit_and_say(evaluate_weights, spec, opts, f"cropbench-eval-{spec.entry}", paths)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "html"]), default="md", show_default=True)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Write to FILE (atomically) instead of stdout."
)
@click.option("--records", type=click.Path(path_type=Path), default=RESULTS / "records", show_default=True)
@click.option(
    "--view",
    type=click.Choice(["all", "results", "reproduction"]),
    default="all",
    show_default=True,
    help="results: per-scale tables; reproduction: paper vs ours per entry, and claims; all: both (csv: results).",
)
def leaderboard(fmt: str, out: Path | None, records: Path, view: str) -> None:
    """Comparison tables regenerated from records only (byte-identical when run twice)."""
    from cropbench.records import load_records
    from cropbench.tables import leaderboard as make
    from cropbench.tables import write_leaderboard

    recs = load_records(records)
    if out is None:
        click.echo(make(recs, fmt, view), nl=False)
    else:
        write_leaderboard(recs, out, fmt, view)
        click.echo(f"wrote {out}")


@cli.command()
@click.option("--scale", type=click.Choice(SCALES), default=None, help="Only this scale.")
@click.option("--records", type=click.Path(path_type=Path), default=RESULTS / "records", show_default=True)
@click.option("--golden", type=click.Path(path_type=Path), default=RESULTS / "golden", show_default=True)
@click.option(
    "--require-all",
    is_flag=True,
    help="A golden without a fresh record is a miss (CI); by default it is listed as not run.",
)
@click.option("--allow-missing", is_flag=True, hidden=True, help="The default now; kept for old scripts.")
def check(scale: str | None, records: Path, golden: Path, require_all: bool, allow_missing: bool) -> None:
    """Compare records with golden records, reference numbers and claims: every comparison made,
    passes and misses, and what was not run; exit 1 on any miss."""
    from cropbench.checks import check as run_check

    if require_all and allow_missing:
        raise click.UsageError("--require-all and --allow-missing contradict each other")
    report = run_check(records, golden, scale=scale, require_all=require_all)
    click.echo(report.table(), nl=False)
    sys.exit(0 if report.passed else 1)


@cli.group(cls=_Group)
def data() -> None:
    """Embedded datasets."""


@data.command()
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=None,
    help="Data root (default $CROPBENCH_DATA or ~/.cache/cropbench/data).",
)
@click.option("--only", multiple=True, help="Only these synthetic datasets (repeatable).")
def synth(root: Path | None, only: tuple[str, ...]) -> None:
    """Materialise the embedded synthetic datasets in their real on-disk layouts."""
    from cropbench.data import dataset_folder

    names = [n for n in DATASETS.names() if DATASETS.get(n).synthetic]
    for name in only:
        if name not in names:
            raise click.BadParameter(
                f"{name!r} is not a synthetic dataset; choose from {', '.join(names)}", param_hint="--only"
            )
    for name in only or names:
        click.echo(f"{name:<20} {dataset_folder(name, root)}")


@cli.command()
@click.argument("entry")
@click.option("--variant", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=Path("views.png"), show_default=True)
@click.option("--n-images", default=4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), default=None)
def views(entry: str, variant: str | None, out: Path, n_images: int, seed: int, data_root: Path | None) -> None:
    """Draw sample images with their views and boxes; print per-pair view statistics."""
    from cropbench.viewplot import render_views

    e = load_entry(entry)
    stats = render_views(entry, variant or e.variant_names()[0], out, n_images=n_images, seed=seed, data_root=data_root)
    for k, v in stats.items():
        click.echo(f"{k:<28} {v:.4f}")
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["detectron2", "torchvision"]), required=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output file (default next to CKPT).")
def export(checkpoint: Path, fmt: str, out: Path | None) -> None:
    """Export a checkpoint's backbone for detectron2 (.pkl) or torchvision (.pth)."""
    from cropbench.export import export_checkpoint

    out = out or checkpoint.with_suffix(".pkl" if fmt == "detectron2" else ".torchvision.pth")
    click.echo(f"wrote {export_checkpoint(checkpoint, fmt, out)}")


@cli.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's current).")
@click.option("--quick", is_flag=True, help="Small sizes: under a minute on 2 CPU cores (no e2e unless --only).")
@click.option("--only", default=None, help="Comma-separated sections: views,step,linear,gpu,e2e (default: all).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the figures here.")
@click.option("--strict", is_flag=True, help="Exit 1 when a target is missed (default: print FAIL, exit 0).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe override for step, gpu and e2e.")
@click.option(
    "--against",
    metavar="REV",
    default=None,
    help="e2e: also run the command with git revision REV's code, interleaved (target >= 1.3x faster).",
)
@click.option(
    "--e2e-repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="e2e --against: timed runs per side.",
)
def bench(
    device: str,
    threads: int | None,
    quick: bool,
    only: str | None,
    json_path: Path | None,
    strict: bool,
    sets: tuple,
    against: str | None,
    e2e_repeats: int,
) -> None:
    """Our views, training step and linear probe side by side with plain references (interleaved)."""
    from cropbench.bench import BenchOptions, parse_sections, run_bench

    sections = parse_sections(only, quick)
    if against and "e2e" not in sections:
        raise CropbenchError("--against compares the e2e section: add it with --only ...,e2e")
    opts = BenchOptions(
        device,
        threads,
        quick,
        sections,
        json_path,
        strict,
        parse_overrides(sets),
        against=against,
        e2e_repeats=e2e_repeats,
    )
    code = run_bench(opts, click.echo)
    if code:
        sys.exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
