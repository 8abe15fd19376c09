"""Model quality on the real BreastMNIST: the medzoo recipe against the MedMNIST v2 protocol.

Each (recipe, architecture, seed) is a full ``zoo train`` run (``zoo.train.train``) on the official
splits of ``breastmnist.npz`` (28 px): model selection on validation, the test split evaluated once
at the end. Results go, one JSON line per run, to ``--results`` (a run already there is not run
again, so several processes — or an interrupted one — fill the same file); the summary prints every
run, then per recipe × architecture the mean ± standard deviation (and range) of test AUC and ACC
over the seeds, the wall and CPU time per seed, and the published figures (MedMNIST v2, Table 3)
the medzoo recipe is measured against; the v2 protocol, measured in the same file, is the baseline.
With ``--ensemble`` the seeds of each medzoo recipe are also combined into one ensemble bundle
(``zoo.train.ensemble_bundles``) and its test metrics reported. ``--variant NAME --set KEY=VALUE``
records a variant of a recipe (an ablation) under its own name.

On a host shared with other jobs the wall time grows with their load; the CPU time of the process
(one thread: ``--threads 1``) is what an idle core would take, and is printed beside it.

    python bench/bench_quality.py --recipes medmnist-v2 medzoo-28 --archs simplecnn resnet18 \\
        --seeds 0 1 2 --threads 1 --ensemble --results bench/results/quality.jsonl
    python bench/bench_quality.py --recipes medzoo-28 --archs simplecnn --variant no-tta \\
        --set families.ultrasound.tta=[]
    python bench/bench_quality.py --summary --results bench/results/quality.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zoo.benchmarks import best_published, published
from zoo.io import atomic_write_bytes, file_lock
from zoo.recipe import apply_overrides, find_recipe
from zoo.train import train

# The shared data folder beside the checkout (or beside one of its parents, for a git worktree)
DATA = next((q / "shared" / "data" / "medmnist" for q in Path(__file__).resolve().parents
             if (q / "shared" / "data" / "medmnist").is_dir()), Path("shared/data/medmnist"))
DATASET = "breastmnist"


def key(r: dict[str, Any]) -> tuple[str, str, int, int | None, str]:
    return r["recipe"], r["arch"], r["seed"], r.get("epochs_override"), r.get("variant", "")


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one line: read-modify-write through the atomic writer, under a lock, so that parallel
    runs filling the same file neither tear nor lose lines."""
    with file_lock(path.with_name(path.name + ".lock")):
        rows = load_results(path) + [row]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def run_one(recipe_name: str, arch: str, seed: int, epochs: int | None, data_root: Path, store: Path,
            variant: str = "", settings: dict[str, str] | None = None) -> dict:
    """Train one seed; what the card says about it."""
    recipe = find_recipe(DATASET, arch, recipe=recipe_name)
    overrides: dict[str, Any] = {**(settings or {}), "seed": seed}
    if epochs:
        overrides["epochs"] = epochs
    recipe = apply_overrides(recipe, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(recipe, data_root=data_root, store=store, progress=False, download=False)
    cpu = time.process_time() - c0
    card = result.card
    return {
        "recipe": recipe_name, "variant": variant, "settings": settings or {}, "arch": arch, "seed": seed,
        "epochs_override": epochs,
        "epochs": recipe.train.epochs, "epochs_run": card.training.epochs_run, "best_epoch": card.metrics.best_epoch,
        "test_auc": card.metrics.test.auc, "test_acc": card.metrics.test.acc,
        "val_auc": card.metrics.val.auc, "val_acc": card.metrics.val.acc,
        "train_time_s": card.training.time_s, "wall_s": round(time.perf_counter() - t0, 1),
        # CPU seconds of this process (user + system): on a host shared with other jobs the wall
        # time grows with their load; with one thread the CPU time is what an idle core would take
        "cpu_s": round(cpu, 1), "load_avg": [round(x, 2) for x in os.getloadavg()],
        "threads": card.training.threads, "device": card.training.device_name, "bundle": str(result.bundle),
        "torch": card.versions.get("torch"), "created": card.created,
    }


def _name(r: dict[str, Any]) -> str:
    """The recipe, and the variant's label when the run changed settings (``--variant``)."""
    return f"{r['recipe']} [{r['variant']}]" if r.get("variant") else r["recipe"]


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({min(values):.3f}–{max(values):.3f})"


def _baseline(groups: dict[tuple[str, str, int], list[dict[str, Any]]], arch: str) -> list[dict[str, Any]]:
    """The v2 protocol's runs of ``arch`` measured in the same file (the group with most seeds)."""
    v2 = [(len(rs), ep, rs) for (rec, a, ep), rs in groups.items() if rec == "medmnist-v2" and a == arch]
    return max(v2, key=lambda t: t[:2])[2] if v2 else []


def _versus(rs: list[dict[str, Any]], base: list[dict[str, Any]]) -> str:
    """Mean differences against the baseline and the ratio of the AUC spreads (< 1: narrower)."""
    if not base or rs[0]["recipe"] == "medmnist-v2":
        return "-"
    d_auc = statistics.mean(r["test_auc"] for r in rs) - statistics.mean(r["test_auc"] for r in base)
    d_acc = statistics.mean(r["test_acc"] for r in rs) - statistics.mean(r["test_acc"] for r in base)
    text = f"{d_auc:+.3f}, {d_acc:+.3f}"
    sd_base = statistics.stdev(r["test_auc"] for r in base) if len(base) > 1 else 0.0
    if len(rs) > 1 and sd_base > 0:
        text += f", {statistics.stdev(r['test_auc'] for r in rs) / sd_base:.2f}"
    return text + f" (v2 {base[0]['epochs']} ep, {len(base)} seeds)"


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def summary(rows: list[dict[str, Any]]) -> str:
    """The Markdown tables: every run, then mean ± std per recipe × architecture."""
    out = ["| recipe | arch | seed | epochs (run) | best epoch | test AUC | test ACC | val AUC | wall time | "
           "CPU time | load avg |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    seeds = [r for r in rows if r.get("kind", "seed") == "seed"]
    for r in sorted(seeds, key=lambda r: (r["arch"], _name(r), r["epochs"], r["seed"])):
        load = r.get("load_avg")
        out.append(f"| {_name(r)} | {r['arch']} | {r['seed']} | {r['epochs']} ({r['epochs_run']}) | "
                   f"{r['best_epoch']} | {r['test_auc']:.3f} | {r['test_acc']:.3f} | {r['val_auc']:.3f} | "
                   f"{_minutes(r['train_time_s'])} | {_minutes(r.get('cpu_s'))} | {load[0] if load else '-'} |")
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in seeds:
        groups.setdefault((_name(r), r["arch"], r["epochs"]), []).append(r)
    # The validation AUC is what a variant is chosen by (the test columns are read, never chosen on).
    out += ["", "| recipe | arch | epochs | seeds | val AUC mean | test AUC mean ± sd (range) | "
                "test ACC mean ± sd (range) | wall / CPU time per seed | vs v2: Δ AUC, Δ ACC, sd AUC ratio |",
            "|---|---|---:|---:|---:|---|---|---:|---|"]
    for (rec, arch, ep), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        wall = statistics.mean(r["train_time_s"] for r in rs)
        cpus = [r["cpu_s"] for r in rs if r.get("cpu_s") is not None]
        cpu = statistics.mean(cpus) if cpus else None
        val = statistics.mean(r["val_auc"] for r in rs)
        out.append(f"| {rec} | {arch} | {ep} | {len(rs)} | {val:.3f} | {_stats([r['test_auc'] for r in rs])} | "
                   f"{_stats([r['test_acc'] for r in rs])} | {_minutes(wall)} / {_minutes(cpu)} | "
                   f"{_versus(rs, _baseline(groups, arch))} |")
    ens = [r for r in rows if r.get("kind") == "ensemble"]
    if ens:
        out += ["", "| ensemble (one bundle) | arch | seeds | test AUC | test ACC |", "|---|---|---|---:|---:|"]
        out += [f"| {_name(r)} | {r['arch']} | {r['seeds']} | {r['test_auc']:.3f} | {r['test_acc']:.3f} |"
                for r in ens]
    best = best_published(DATASET)
    out += ["", "Published (MedMNIST v2, Table 3): " + "; ".join(f"{p.method} {p.auc:.3f} / {p.acc:.3f}"
                                                              for p in published(DATASET))]
    if best is not None:
        out.append(f"Best published AUC: {best.method} {best.auc:.3f} (ACC {best.acc:.3f}); "
                   f"best published ACC: {max(p.acc for p in published(DATASET)):.3f}")
    return "\n".join(out)


def ensemble_row(recipe_name: str, arch: str, members: list[dict[str, Any]], data_root: Path, store: Path,
                 variant: str = "") -> dict:
    """Combine the seeds' bundles into one ensemble bundle; its test metrics (evaluated once)."""
    from zoo.train.ensemble import ensemble_bundles

    result = ensemble_bundles([Path(r["bundle"]) for r in members], data_root=data_root, store=store,
                              download=False)
    card = result.card
    return {"kind": "ensemble", "recipe": recipe_name, "variant": variant, "arch": arch,
            "seeds": [r["seed"] for r in members],
            "seed": -1, "epochs": members[0]["epochs"], "epochs_run": 0, "best_epoch": -1,
            "test_auc": card.metrics.test.auc, "test_acc": card.metrics.test.acc, "val_auc": card.metrics.val.auc,
            "val_acc": card.metrics.val.acc, "train_time_s": 0.0, "threads": torch.get_num_threads(),
            "bundle": str(result.bundle)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["medmnist-v2", "medzoo-28"])
    ap.add_argument("--archs", nargs="+", default=["simplecnn", "resnet18"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (labelled as such)")
    ap.add_argument("--data-root", type=Path, default=DATA)
    ap.add_argument("--store", type=Path, default=None, help="bundle store (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a busy shared host)")
    ap.add_argument("--results", type=Path, default=Path("bench/results/quality.jsonl"))
    ap.add_argument("--ensemble", action="store_true", help="also combine each medzoo recipe's seeds")
    ap.add_argument("--variant", default="", help="label of a recipe variant (with --set), kept in the results")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override of the variant")
    ap.add_argument("--summary", action="store_true", help="only print the summary of --results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(item.split("=", 1) for item in args.set)
    if not args.summary:
        with tempfile.TemporaryDirectory() as tmp:
            store = args.store or Path(tmp)
            for arch in args.archs:
                for rec in args.recipes:
                    run_recipe(args, rec, arch, settings, store)
    print(summary(load_results(args.results)))


def run_recipe(args: argparse.Namespace, rec: str, arch: str, settings: dict[str, str], store: Path) -> None:
    """Every seed of one recipe × architecture not yet in the results, then (``--ensemble``) their ensemble."""
    for seed in args.seeds:
        if (rec, arch, seed, args.epochs, args.variant) in {key(r) for r in load_results(args.results)}:
            continue
        row = run_one(rec, arch, seed, args.epochs, args.data_root, store, args.variant, settings)
        print(json.dumps(row), flush=True)
        append_result(args.results, row)
    if args.ensemble and rec != "medmnist-v2":
        members = [r for r in load_results(args.results)
                   if key(r)[:2] == (rec, arch) and r["seed"] in args.seeds and r.get("kind", "seed") == "seed"
                   and r.get("epochs_override") == args.epochs and r.get("variant", "") == args.variant
                   and Path(r["bundle"]).is_dir()]
        if len(members) >= 2:
            row = ensemble_row(rec, arch, members, args.data_root, store, args.variant)
            print(json.dumps(row), flush=True)
            append_result(args.results, row)


if __name__ == "__main__":
    main()
