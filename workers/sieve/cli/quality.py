"""``sieve eval`` and ``sieve fit``: route files measured, and their thresholds fitted, on labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sieve.cli.base import BackendOpt, EncoderKind, ModelOpt, QuietOpt, command_line, console, fail
from sieve.cli.progress import progress_for
from sieve.cli.workbench import (
    CacheOpt,
    DataArg,
    HeadOpt,
    PlotsOpt,
    ResplitOpt,
    SampleOpt,
    SeedOpt,
    labelled,
    open_bench,
)

if TYPE_CHECKING:
    from sieve.progress import Progress
    from sieve.quality.targets import Targets
    from sieve.quality.workbench import Workbench

app = typer.Typer()


@app.command("eval")
def eval_command(
    data: DataArg,
    routes: Annotated[Path, typer.Option("--routes", "-r", help="The route file to evaluate.")],
    compare: Annotated[
        list[Path] | None, typer.Option(help="Another route file, side by side (repeatable).")
    ] = None,
    split: Annotated[str, typer.Option(help="test, calibration, train, or all.")] = "test",
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("out/eval"),
    seed: SeedOpt = 0,
    sample: SampleOpt = None,
    resplit: ResplitOpt = False,
    head: HeadOpt = True,
    plots: PlotsOpt = True,
    cache: CacheOpt = True,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
    folds: Annotated[
        int | None,
        typer.Option(help="Per category (data with category labels): K folds over all examples, per-category "
                          "thresholds fitted on K-1, multi-label against top-1; writes OUT/categories.md."),
    ] = None,
    min_precision: Annotated[
        list[str] | None,
        typer.Option(help="With --folds: ROUTE=P, a category route's precision target (repeatable; "
                          "others 0.9)."),
    ] = None,
    z: Annotated[float, typer.Option(help="With --folds: targets hold at the Wilson lower bound with this z "
                                          "(0: the point estimate).")] = 1.0,
) -> None:
    """Run labelled data through the worker's batch functions; write a report (Markdown, JSON, PNG)."""
    from sieve.flow.head import HeadError
    from sieve.quality.report import write_report
    from sieve.quality.runner import run_eval
    from sieve.routeset import RouteSetError

    if split not in ("test", "calibration", "train", "all"):
        fail(f"--split must be test, calibration, train or all, not {split!r}")
    progress = progress_for(console, quiet=quiet)
    bench = open_bench(data, seed, sample, encoder, model, cache, resplit, backend, progress=progress)
    if folds is not None:
        _eval_categories(bench, routes, parse_targets(min_precision, None, z, default=0.9), folds, seed, out,
                         progress)
        return
    try:
        report = run_eval(bench, labelled([routes, *(compare or [])]), split=split,
                          command=command_line(), use_head=head, progress=progress)
    except (RouteSetError, HeadError, ValueError) as exc:
        fail(str(exc))
    paths = write_report(report, out, plots=plots)
    for note in report.notes:
        if note.startswith("WARNING"):
            console.print(f"[yellow]{note}[/yellow]")
    s = report.primary.summary
    novel = f", novel {s.novel_share:.1%}" if s.novel_share is not None else ""
    console.print(
        f"{report.primary.label}: auto {s.auto_share:.1%} at accuracy {s.auto_accuracy or 0:.3f}, "
        f"review {s.review_share:.1%}{novel} ({s.events} events); report {paths['markdown']}"
    )


def _eval_categories(bench: Workbench, routes: Path, targets: Targets, folds: int, seed: int, out: Path,
                     progress: Progress) -> None:
    """``sieve eval --folds K``: per category, k-fold, multi-label against top-1."""
    from sieve.quality.categories_report import write_category_report
    from sieve.quality.categories_run import run_category_kfold
    from sieve.routeset import RouteSetError

    try:
        report = run_category_kfold(bench, routes, targets, folds=folds, seed=seed, command=command_line(),
                                    progress=progress)
    except (RouteSetError, ValueError) as exc:
        fail(str(exc))
    paths = write_category_report(report, out)
    for system in report.systems:
        b = system.binary
        console.print(f"{system.label}: auto {b.auto_share:.1%} at accuracy {b.accuracy or 0:.3f}")
    console.print(f"report {paths['markdown']}")


def parse_targets(min_precision: list[str] | None, min_accuracy: float | None, z: float,
                  default: float = 0.95) -> Targets:
    """The fit's targets from ``--min-precision OUTCOME=P`` items and ``--min-accuracy`` (default 0.95).

    An item may name a route instead of an outcome (``hate=0.9``): a multi-mode set's fit
    fits each category route to its own target.
    """
    from sieve.quality.targets import Targets

    precision: dict[str, float] = {}
    for item in min_precision or []:
        outcome, sep, value = item.partition("=")
        try:
            precision[outcome.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not outcome.strip():
            fail(f"--min-precision takes OUTCOME=P, e.g. violating=0.9; got {item!r}")
    if not precision and min_accuracy is None:
        min_accuracy = default
    try:
        return Targets(precision=precision, accuracy=min_accuracy, z=z)
    except ValueError as exc:
        fail(str(exc))


@app.command("fit")
def fit_command(
    data: DataArg,
    routes: Annotated[Path, typer.Option("--routes", "-r", help="The route file to fit.")],
    compare: Annotated[
        list[Path] | None, typer.Option(help="Another route file, fitted and compared too (repeatable).")
    ] = None,
    min_precision: Annotated[
        list[str] | None,
        typer.Option(help="OUTCOME=P: automatic decisions of that outcome at least this precise "
                          "(repeatable)."),
    ] = None,
    min_accuracy: Annotated[
        float | None,
        typer.Option(help="All automatic decisions at least this accurate (default 0.95 when no "
                          "--min-precision is given)."),
    ] = None,
    z: Annotated[float, typer.Option(help="Targets must hold at the Wilson lower bound with this z (0: the "
                                          "calibration point estimate).")] = 1.0,
    min_support: Annotated[
        int, typer.Option(help="A route gets thresholds of its own when it tops this many calibration events "
                               "(0: never).")
    ] = 50,
    novel_share: Annotated[
        float, typer.Option(help="The novelty threshold flags this share of the calibration events as novel "
                                 "(they never get the default outcome automatically); 0: no threshold.")
    ] = 0.05,
    novel_default: Annotated[
        bool, typer.Option("--novel-default", help="Declare novel events safe (default outcome) if the test "
                                                   "split shows them at the target; `sieve eval` warns.")
    ] = False,
    lead_cost: Annotated[
        float | None, typer.Option(help="Also fit defaults.default_lead: the largest lead (0.05 .. 0.5) that "
                                        "costs at most this share of calibration automation (e.g. 0.02).")
    ] = None,
    unseen_share: Annotated[
        float | None, typer.Option(help="Fit as if this share of traffic (e.g. 0.5) came from topics the "
                                        "routes lack: calibration events scored without their own route.")
    ] = None,
    fitted: Annotated[
        Path | None,
        typer.Option(help="Where the fitted route file goes (default: OUT/<routes>.fitted.yaml)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("out/fit"),
    seed: SeedOpt = 0,
    sample: SampleOpt = None,
    resplit: ResplitOpt = False,
    head: HeadOpt = True,
    plots: PlotsOpt = True,
    cache: CacheOpt = True,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Fit thresholds on calibration data to meet precision targets with the least review; report on test."""
    from sieve.flow.head import HeadError
    from sieve.quality.report import write_report
    from sieve.quality.runner import run_fit
    from sieve.routeset import RouteSetError

    targets = parse_targets(min_precision, min_accuracy, z)
    progress = progress_for(console, quiet=quiet)
    bench = open_bench(data, seed, sample, encoder, model, cache, resplit, backend, progress=progress)
    if not bench.splits.calibration.examples or not bench.splits.test.examples:
        fail(f"{data}: no calibration or no test examples to fit on (a test-only set takes --resplit)")
    fitted_out = fitted or out / f"{routes.stem}.fitted.yaml"
    if _is_multi(routes):
        if lead_cost is not None or unseen_share is not None:
            fail("--lead-cost and --unseen-share fit a three-way set; a multi-mode set's categories are "
                 "fitted to their precision alone: write its defaults.default_lead by hand (docs/routes.md)")
        _fit_categories(bench, routes, targets, fitted_out, out, progress)
        return
    try:
        report, fit = run_fit(bench, labelled([routes, *(compare or [])]), targets, fitted_out=fitted_out,
                              min_support=min_support or None, novel_share=novel_share or None,
                              novel_default=novel_default, lead_cost=lead_cost, unseen_share=unseen_share,
                              command=command_line(),
                              use_head=head, progress=progress)
    except (RouteSetError, HeadError, ValueError) as exc:
        fail(str(exc))
    paths = write_report(report, out, plots=plots)
    s = report.primary.summary
    if fit.novelty is not None:
        nov = fit.novelty
        console.print(f"novelty threshold {nov.threshold:g}: {nov.baseline or 0:.1%} of calibration novel; "
                      f"novel events -> {nov.on_novel}; on test: novel {s.novel_share or 0:.1%}")
    if fit.route_set.defaults.default_lead is not None:
        console.print(f"default lead {fit.route_set.defaults.default_lead:g}")
    console.print(
        f"fitted on calibration (review {fit.calibration.review_share:.1%}, targets "
        f"{'met' if fit.calibration.feasible else 'NOT met'}); on test: auto {s.auto_share:.1%} at accuracy "
        f"{s.auto_accuracy or 0:.3f}, review {s.review_share:.1%}. Route file {fitted_out}; report "
        f"{paths['markdown']}"
    )


def _is_multi(routes: Path) -> bool:
    """Whether the route file declares ``mode: multi`` (an unreadable file: not, the fit says why)."""
    from sieve.routeset import RouteSetError, load_route_set

    try:
        return load_route_set(routes).mode == "multi"
    except RouteSetError:
        return False


def _fit_categories(bench: Workbench, routes: Path, targets: Targets, fitted_out: Path, out: Path,
                    progress: Progress) -> None:
    """``sieve fit`` of a multi-mode set: each category route's accept fitted to its precision target."""
    from sieve.quality.categories_report import write_category_report
    from sieve.quality.categories_run import run_category_fit
    from sieve.routeset import RouteSetError

    try:
        report, fit = run_category_fit(bench, routes, targets, fitted_out=fitted_out, command=command_line(),
                                       progress=progress)
    except (RouteSetError, ValueError) as exc:
        fail(str(exc))
    paths = write_category_report(report, out)
    unmet = [name for name, ok in zip(report.targets, fit.met, strict=True) if not ok]
    console.print(f"fitted {len(report.targets)} category routes on calibration"
                  f"{'; targets NOT met: ' + ', '.join(unmet) if unmet else ''}. Route file {fitted_out}; "
                  f"report {paths['markdown']}")
