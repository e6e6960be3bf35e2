"""Chapter 08: fine-tuning BERT and GPT as sentiment classifiers, pretrained against random init.

Starts from chapter 07's BERT (pretrained on IMDB's unlabelled reviews) and the longer-pretrained
BERT minillm ships in data/pretrained; with --families ...,gpt it also pretrains a GPT of chapter 07's
size on the same reviews. Each model, and the same model from random weights, is fine-tuned on SST-2
(and with --tasks sst2,imdb on IMDB) with a few labels and with all of them, for each seed, with one
recipe (minillm.finetune.FinetuneConfig). Reports mean ± spread tables and learning curves (accuracy
against labelled examples, log scale).

    python chapters/ch08_finetune.py --bert runs/ch07     # the main job's grid: SST-2, 1,000 labels and all, ~9 min
    python chapters/ch08_finetune.py --bert runs/ch07 --families bert,shipped,gpt --budgets 500,2000 --seeds 1,2,3
    python chapters/ch08_finetune.py --families shipped --tasks imdb --seeds 1,2,3   # IMDB test, 1,000 labels
    python chapters/ch08_finetune.py --quick              # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
import statistics
from dataclasses import asdict, dataclass, field

from minillm import datasets, metrics, plots, runs
from minillm.bert_pretraining import chapter07_pretraining
from minillm.config import run_chapter
from minillm.device import describe_device, pick_device, seed_everything
from minillm.files import read_json, write_json
from minillm.finetune import ClassificationTask, FinetuneConfig, classifier_candidates, encoded_splits, finetune
from minillm.pretrain import pretrain_gpt_on_reviews

FAMILIES = {"bert": "BERT", "shipped": "BERT, pretrained longer (shipped)", "gpt": "GPT"}  # --families: table names


@dataclass
class Config(FinetuneConfig):
    """Chapter 08: BERT and GPT, pretrained and from random init, fine-tuned on SST-2 and IMDB at several label budgets."""

    out: str = field(default="runs/ch08", metadata={"help": "run folder (finished fine-tuning runs in it are reused)"})
    bert: str = field(default="pretrain", metadata={"help": "the BERT of family 'bert': a 'pretrain bert' / chapter 07 run "
                                                            "folder, 'pretrain' (chapter 07's recipe, now, into "
                                                            "<out>/bert_pretraining; reused once finished) or 'shipped'"})
    families: str = field(default="bert,shipped", metadata={"help": "comma-separated models to fine-tune, each also from "
                                                                      "random init: bert (--bert's run), shipped (the BERT "
                                                                      "pretrained longer in data/pretrained), gpt (a GPT of "
                                                                      "--bert's size pretrained here on the same reviews)"})
    gpt_iters: int = field(default=600, metadata={"help": "steps of GPT pretraining on the reviews (batch 32 x 128 tokens)"})
    tasks: str = field(default="sst2", metadata={"help": "comma-separated: sst2 (reported on SST-2 dev), imdb "
                                                              "(reported on IMDB test)"})
    budgets: str = field(default="1000,all", metadata={"help": "comma-separated labelled-example budgets ('all': every "
                                                                "training example)"})
    imdb_budgets: str = field(default="1000", metadata={"help": "IMDB's budgets (its 'all' is 22,500 long reviews: slow on a CPU)"})
    seeds: str = field(default="1", metadata={"help": "comma-separated fine-tuning seeds (the recipe was tuned on seed 0)"})
    test_limit: int = field(default=5000, metadata={"help": "score IMDB on a fixed stratified N of its 25,000 test reviews "
                                                            "(0: all of them)"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (at most the model's positions)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training examples (with all of SST-2's labels one "
                                                     "pass is 1,850 steps; few labels get --min-steps)"})
    QUICK = {**FinetuneConfig.QUICK, "families": "bert,shipped,gpt", "tasks": "sst2,imdb", "gpt_iters": 20, "test_limit": 200,
             "budgets": "100,all", "imdb_budgets": "100"}

    def validate(self):
        super().validate()
        for name in ("seeds", "budgets", "imdb_budgets"):
            values = getattr(self, name).split(",")
            if not all(v.strip().isdigit() or (name != "seeds" and v.strip() == "all") for v in values):
                raise ValueError(f"--{name.replace('_', '-')} must be comma-separated integers, got {getattr(self, name)!r}")
        if not set(self.families.split(",")) <= set(FAMILIES):
            raise ValueError(f"--families must be comma-separated names from {', '.join(FAMILIES)}, got {self.families!r}")
        if not set(self.tasks.split(",")) <= {"sst2", "imdb"}:
            raise ValueError(f"--tasks must be sst2, imdb or both, got {self.tasks!r}")


def budget_list(text: str) -> list[int]:
    return [0 if value.strip() == "all" else int(value) for value in text.split(",")]  # 0: all


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    runs.check_results_folder(out)  # a folder of runs: never a run folder itself
    device = pick_device(config.device)
    print(f"Running on {describe_device(device, config.precision)}")
    seeds = [int(s) for s in config.seeds.split(",")]

    # 1. Pretrained models: chapter 07's BERT (or one made now), the shipped one, a GPT pretrained here on the reviews.
    families = config.families.split(",")
    bert_run = lambda: runs.bert_run(config.bert, out / "bert_pretraining", chapter07_pretraining(config))  # noqa: E731
    folders = {"bert": bert_run, "shipped": datasets.shipped_bert_path,
               "gpt": lambda: pretrain_gpt_on_reviews(bert_run(), out / "gpt_pretraining", config.gpt_iters, config)}
    pretrained_runs = {FAMILIES[family]: folders[family]() for family in FAMILIES if family in families}

    # 2. The labelled data: SST-2 (leak-free held-out slice, dev to report) and IMDB (held-out slice, test to report).
    all_splits = {"sst2": datasets.sst2_splits(config.val_fraction, seed=0, limit=config.sst2_limit),
                  "imdb": datasets.imdb_splits(config.val_fraction, seed=0, test_limit=config.test_limit,
                                               limit=2000 if config.quick else 0)}
    tasks = {task: (all_splits[task], budget_list(config.budgets if task == "sst2" else config.imdb_budgets))
             for task in config.tasks.split(",")}
    for task, (splits, budgets) in tasks.items():
        print(f"{task}: {len(splits.train):,} training / {len(splits.val):,} held-out examples; reporting on "
              f"{splits.name} ({len(splits.test):,}); label budgets {', '.join(str(b or 'all') for b in budgets)}")

    # 3. Fine-tune every model and its random-init twin, at every budget, once per seed, with one recipe.
    scores: dict[str, dict[str, dict[int, list[dict]]]] = {}  # task -> model name -> budget -> one result per seed
    for family, run in pretrained_runs.items():
        candidates = classifier_candidates(family, run, config.pooling)  # "<family>, pretrained" / ", random init": builders
        for task, (splits, budgets) in tasks.items():
            encoded, pad_id = encoded_splits(run, splits, config.max_length)  # token ids, this family's tokenizer
            for budget in budgets:
                for seed in seeds:  # each seed its own labelled sample, initialization and batches
                    labelled = datasets.with_labelled(encoded, budget, seed)
                    data = (ClassificationTask(labelled.train, labelled.val, pad_id, seed=seed), labelled.test)
                    for name, build in candidates.items():
                        folder = out / task / f"{name.replace(', ', '-').replace(' ', '_')}-{budget or 'all'}-seed{seed}"
                        run_config = Config(**{**asdict(config), "seed": seed, "overwrite": True, "out": str(folder)})
                        result = reuse_or_finetune(folder, run_config, build, data)
                        scores.setdefault(task, {}).setdefault(name, {}).setdefault(len(labelled.train), []).append(result)

    # 4. Tables (mean ± standard deviation over seeds), learning curves, and pretraining's gain.
    summary = {}
    for task, rows in scores.items():
        splits = tasks[task][0]
        majority_label = max((0, 1), key=[y for _, y in splits.train].count)
        majority = metrics.accuracy([y for _, y in splits.test], [majority_label] * len(splits.test))
        sizes = sorted({n for row in rows.values() for n in row})
        print(f"\n{splits.name}, accuracy % (mean ± sd over seeds {config.seeds}; majority class {majority:.1%}):")
        print(f"{'labelled examples':44}" + "".join(f"{n:>14,}" for n in sizes))
        for name, row in rows.items():
            print(f"{name:44}" + "".join(f"{mean_sd(row[n]):>14}" for n in sizes))
        for family in pretrained_runs:
            pretrained, random = rows[f"{family}, pretrained"], rows[f"{family}, random init"]
            print(f"{family + ': gain (points)':44}" + "".join(f"{gain(pretrained[n], random[n]):>+14.1f}" for n in sizes))
            for n in sizes:
                summary[f"{splits.name}, {n:,} labels: {family}, pretrained / random init (gain)"] = \
                    f"{mean_sd(pretrained[n])} / {mean_sd(random[n])} ({gain(pretrained[n], random[n]):+.1f})"
        curves = {name: {n: [r["accuracy"] for r in row[n]] for n in sizes} for name, row in rows.items()}
        plots.plot_learning_curves(curves, out / f"learning_curve_{task}.png", title=f"{splits.name}: pretrained vs random init",
                                   reference=("majority class", majority))
    every_run = [r for rows in scores.values() for row in rows.values() for results in row.values() for r in results]
    summary["fine-tuning runs that predict one class"] = f"{sum(r['collapsed'] for r in every_run)} of {len(every_run)}"
    results = {"scores": scores, "summary": summary, "config": asdict(config)}
    write_json(out / "results.json", results)
    print(f"\nSaved {', '.join(str(p) for p in sorted(out.glob('learning_curve_*.png')))} and {out / 'results.json'}")
    return results


def gain(pretrained: list[dict], random: list[dict]) -> float:
    """Pretraining's gain in accuracy points: the difference of the two means over seeds."""
    return 100 * (statistics.mean(r["accuracy"] for r in pretrained) - statistics.mean(r["accuracy"] for r in random))


def mean_sd(results: list[dict]) -> str:
    accuracies = [100 * r["accuracy"] for r in results]
    return f"{statistics.mean(accuracies):.1f}" + (f" ± {statistics.stdev(accuracies):.1f}" if len(accuracies) > 1 else "")


def reuse_or_finetune(folder: pathlib.Path, config: Config, build, data) -> dict:
    """A finished run with the same settings is read back, not redone (a long grid resumes where it stopped);
    otherwise fine-tune, and keep the scores and the log but not the weights (a grid would fill the disk)."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "overwrite", "resume", "progress")}
    done = folder / "results.json"
    if done.exists() and read_json(done).get("settings") == settings and "test" in read_json(done):
        return read_json(done)["test"]
    seed_everything(config.seed)  # the classifier's initialization, then the batches
    task, test = data
    result = {**finetune(build(), task, config, test, runs.run_info("classifier", {"name": folder.name}, seed=config.seed), log=lambda m: None),
              "out": str(folder)}
    print(f"  {folder.parent.name}/{folder.name}: accuracy {result['accuracy']:.1%} (held-out {result['val_accuracy']:.1%}, "
          f"best of {result['steps']:,} steps at {result['best_step']:,})", flush=True)
    for name in (runs.CHECKPOINT, runs.BEST_MODEL):
        (folder / name).unlink(missing_ok=True)
    write_json(done, {**read_json(done), "settings": settings, "test": result})
    return result


if __name__ == "__main__":
    run_chapter(main, Config)
