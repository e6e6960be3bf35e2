"""Chapter 12: from a trained model to a service.

Takes the book's two models (a chapter 06 GPT on Tiny Shakespeare and a chapter 08 BERT sentiment classifier on
SST-2), evaluates them on held-out data, and measures what each deployment step costs and buys: int8 quantization
(by hand, then torchao) against fp32 and bf16 in size, accuracy and latency; a 2-layer student distilled from the
classifier against the same student trained on labels alone; ONNX export checked against ONNX Runtime; greedy
generation against Hugging Face transformers on the same weights; and an OpenAI-compatible server on 127.0.0.1
under a bounded load test, with dynamic batching on and off, fp32 and int8.

    python chapters/ch12_deployment.py            # ~25 minutes on a 2-core CPU (it trains both models first)
    python chapters/ch12_deployment.py --quick    # under a minute; what the tests run
"""

from __future__ import annotations

import pathlib
import statistics
from dataclasses import asdict, dataclass, field

import torch

from minillm import data, datasets, plots, runs
from minillm.bert import BertForSequenceClassification
from minillm.config import QuickConfig, run_chapter
from minillm.device import seed_everything
from minillm.distillation import DistillationConfig, distil, footprint, student_from_teacher
from minillm.evaluation import evaluate_run, gpt_held_out_text
from minillm.files import write_json
from minillm.finetune import ClassificationTask, FinetuneConfig, encode_for_bert, finetune, predict
from minillm.generation_speed import race_generation, read_bandwidth
from minillm.gpt import GPTConfig
from minillm.inference_runs import CLASSIFIER, classifier_run_info, load_for_inference
from minillm.load_test import load_test
from minillm.onnx_export import export_onnx
from minillm.pretrain import GPTPretrainConfig, pretrain_gpt
from minillm.quantization import compare_precisions, markdown_table
from minillm.serving import ServingConfig, load_served_model, start_server
from minillm.tokenization import save_library_tokenizer, special_token_ids


@dataclass
class Config(QuickConfig):
    """Chapter 12: evaluate, quantize, distil, export and serve the chapter 06 GPT and the chapter 08 classifier."""

    gpt: str = field(default="", metadata={"help": "a GPT run folder (pretrain gpt / chapter 06); empty: train one in <out>/gpt"})
    classifier: str = field(default="", metadata={"help": "a fine-tuned classifier run folder (python -m minillm finetune); "
                                                          "empty: fine-tune the shipped BERT on SST-2 in <out>/classifier"})
    gpt_iters: int = field(default=2000, metadata={"help": "training steps of the GPT this chapter trains"})
    labelled: int = field(default=20_000, metadata={"help": "SST-2 labels the classifier (and the students) train on (0: all "
                                                            "67,349)"})
    student_layers: int = field(default=2, metadata={"help": "layers of the distilled student (the teacher has 4)"})
    student_steps: int = field(default=800, metadata={"help": "training steps of each student"})
    temperature: float = field(default=2.0, metadata={"help": "distillation temperature T"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft targets (1 - alpha: the labels)"})
    seeds: str = field(default="11,12,13", metadata={"help": "seeds of the student runs compared (not the ones tuned on)"})
    clients: int = field(default=16, metadata={"help": "concurrent clients of the load test"})
    requests: int = field(default=96, metadata={"help": "completions the load test sends per configuration"})
    max_tokens: int = field(default=48, metadata={"help": "tokens each completion asks for"})
    race_tokens: int = field(default=64, metadata={"help": "new tokens per sequence in the race against transformers"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    out: str = field(default="runs/ch12", metadata={"help": "folder for the runs, plots and results.json"})
    QUICK = {"gpt_iters": 30, "labelled": 300, "student_steps": 20, "seeds": "11", "clients": 4, "requests": 8,
             "max_tokens": 8, "race_tokens": 8}

    def validate(self):
        for name in ("gpt_iters", "student_layers", "student_steps", "clients", "requests", "max_tokens", "race_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0 or not 0 <= self.alpha <= 1 or self.labelled < 0:
            raise ValueError("--temperature must be positive, --alpha in [0, 1] and --labelled at least 0")
        if not all(s.strip().isdigit() for s in self.seeds.split(",")):
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}")


def gpt_run(config: Config, out: pathlib.Path) -> pathlib.Path:
    """The chapter 06 GPT: the run given, a finished one in <out>/gpt, or a new one (chapter 06's CPU recipe)."""
    if config.gpt:
        return pathlib.Path(config.gpt)
    folder = out / "gpt"
    if not runs.is_finished(folder):
        quick = GPTPretrainConfig.QUICK if config.quick else {}
        pretrain_gpt(GPTPretrainConfig(**{**quick, "out": str(folder), "overwrite": True, "max_iters": config.gpt_iters,
                                          "progress": False, "sample_tokens": 0}), log=lambda m: None)
    return folder


def classifier_data(tokenizer, config: Config, length: int):
    """SST-2 token ids for the classifier and its students: train (a label budget), held-out and dev."""
    splits = datasets.sst2_splits(0.1, seed=config.seed, limit=3000 if config.quick else 0)
    splits = datasets.with_labelled(splits, config.labelled, config.seed)
    test = splits.test[:96] if config.quick else splits.test  # SST-2 dev: 872 sentences
    return [encode_for_bert(tokenizer, split, length) for split in (splits.train, splits.val, test)]


def classifier_run(config: Config, out: pathlib.Path) -> pathlib.Path:
    """The chapter 08 classifier: the run given, a finished one in <out>/classifier, or the shipped BERT fine-tuned
    on SST-2 now (mean pooling, every weight), saved as ``python -m minillm finetune`` saves it."""
    if config.classifier:
        return pathlib.Path(config.classifier)
    folder = out / "classifier"
    if not runs.is_finished(folder):
        pretrained, tokenizer, _ = runs.load_run(datasets.shipped_bert_path(), expect="bert")
        settings = FinetuneConfig(**{**(FinetuneConfig.QUICK if config.quick else {}), "out": str(folder),
                                     "overwrite": True, "progress": False, "max_length": 64, "seed": config.seed})
        train, val, test = classifier_data(tokenizer, config, settings.max_length)
        seed_everything(config.seed)
        model = BertForSequenceClassification.from_pretraining(pretrained, pooling="mean")
        info = runs.run_info(CLASSIFIER, classifier_run_info(pretrained.config, "mean", "full", {}, "shipped"))
        finetune(model, ClassificationTask(train, val, special_token_ids(tokenizer).pad, seed=config.seed), settings,
                 test, info, log=lambda m: None, prepare=lambda f: save_library_tokenizer(tokenizer, f / runs.TOKENIZER))
    return folder


def quantization_section(gpt_folder, classifier_folder, config: Config, out: pathlib.Path) -> dict:
    """3. fp32 vs bf16 vs int8 (by hand, torchao): size, quality, latency at batch 32 (classifier) and 8 (GPT)."""
    classifier, tokenizer, _ = load_for_inference(classifier_folder)
    pad = special_token_ids(tokenizer).pad
    dev = classifier_data(tokenizer, config, 64)[2]  # SST-2 dev
    task = ClassificationTask(dev[:2], dev[:2], pad)

    def dev_accuracy(model) -> float:
        predicted, true = predict(model, task, dev, "cpu", precision="fp32")
        return sum(p == t for p, t in zip(predicted, true)) / len(true)

    batch = data.pad_batch([ids for ids, _ in dev[:32]], pad_id=pad)  # (32, T)
    tables = {"classifier": compare_precisions(classifier, {"input_ids": batch["input_ids"],
                                                            "attention_mask": batch["attention_mask"]},
                                               dev_accuracy, embeddings=True, compile_library=not config.quick,
                                               repeats=3 if config.quick else 10)}
    gpt, gpt_tokenizer, gpt_config = load_for_inference(gpt_folder)
    val_ids = torch.tensor(gpt_tokenizer.encode(gpt_held_out_text(gpt_folder, gpt_config)), dtype=torch.long)
    block = gpt.config.block_size
    starts = torch.arange(0, min(len(val_ids) - block - 1, (16 if config.quick else 256) * block), block)  # held-out blocks
    x, y = torch.stack([val_ids[s:s + block] for s in starts]), torch.stack([val_ids[s + 1:s + block + 1] for s in starts])
    tables["gpt"] = compare_precisions(gpt, (x[:8],), lambda model: model(x, y)[1].item(), compile_library=not config.quick,
                                       repeats=3 if config.quick else 10)
    for name, rows in tables.items():
        print(f"\n3. {name}: " + ("SST-2 dev accuracy" if name == "classifier" else "held-out loss (nats/token)") +
              f", weights, latency of a batch of {32 if name == 'classifier' else 8}\n" + markdown_table(rows))
    return tables


def distillation_section(classifier_folder, config: Config, out: pathlib.Path) -> dict:
    """4. A 2-layer student: the teacher's soft targets + labels vs labels alone, over several seeds."""
    teacher, tokenizer, _ = load_for_inference(classifier_folder)
    pad = special_token_ids(tokenizer).pad
    train, val, test = classifier_data(tokenizer, config, 64)
    scores: dict[str, list[dict]] = {"distilled": [], "labels only": []}
    for seed in [int(s) for s in config.seeds.split(",")]:
        for kind in scores:
            seed_everything(seed)
            student = student_from_teacher(teacher, n_layer=config.student_layers)
            settings = dict(out=str(out / "students" / f"{kind.replace(' ', '-')}-{seed}"), overwrite=True, progress=False,
                            seed=seed, epochs=1, min_steps=config.student_steps, max_length=64)
            if kind == "distilled":
                result = distil(teacher, student, train, val, test, pad, DistillationConfig(
                    **settings, temperature=config.temperature, alpha=config.alpha), log=lambda m: None)
            else:
                result = finetune(student, ClassificationTask(train, val, pad, seed=seed), FinetuneConfig(**settings), test,
                                  log=lambda m: None)
            scores[kind].append({"accuracy": result["accuracy"], "collapsed": result["collapsed"], "seed": seed})
    sizes = {"teacher": footprint(teacher, test, pad), "student": footprint(student, test, pad)}
    print(f"\n4. Distillation into {config.student_layers} layers (T={config.temperature:g}, alpha={config.alpha:g}), "
          f"SST-2 dev accuracy over seeds {config.seeds}:")
    for kind, rows in scores.items():
        accuracies = [100 * row["accuracy"] for row in rows]
        spread = f" ± {statistics.stdev(accuracies):.1f}" if len(accuracies) > 1 else ""
        print(f"   student, {kind:>11}: {statistics.mean(accuracies):.1f}{spread}")
    for name, size in sizes.items():
        print(f"   {name}: {size['parameters']:,} parameters, {size['megabytes']:.1f} MB, "
              f"{size['latency_ms']:.0f} ms per batch of {size['latency_batch']}")
    return {"students": scores, "sizes": sizes}


def export_section(gpt_folder, classifier_folder, out: pathlib.Path) -> dict:
    """5. ONNX: both models exported with dynamic batch and length, checked against ONNX Runtime."""
    checks = {}
    for name, folder in (("gpt", gpt_folder), ("classifier", classifier_folder)):
        model, _, _ = load_for_inference(folder)
        export = export_onnx(model, out / f"{name}.onnx")
        worst = max(check.max_abs_diff for check in export.checks)
        checks[name] = {"max_abs_diff": worst, "shapes": [[check.batch, check.length] for check in export.checks],
                        "megabytes": export.path.stat().st_size / 1e6}
        print(f"\n5. {name}: {export.path.name} ({checks[name]['megabytes']:.1f} MB), ONNX Runtime vs PyTorch at "
              f"{len(export.checks)} shapes: max |difference| {worst:.1e}")
    return checks


def serving_section(gpt_folder, classifier_folder, config: Config, out: pathlib.Path) -> dict:
    """7. The OpenAI-compatible server on 127.0.0.1 under a bounded load: N concurrent clients, a fixed number of
    completions each configuration, dynamic batching on (16 sequences) and off (1), fp32 and int8."""
    payload = {"model": "gpt", "prompt": "ROMEO:\n", "max_tokens": config.max_tokens, "temperature": 0.8}
    rows, latencies = [], {}
    for precision in ("fp32",) if config.quick else ("fp32", "int8"):  # quick: int8 serving is tested elsewhere
        served = load_served_model(gpt_folder, quantize="int8" if precision == "int8" else None, name="gpt")
        for max_batch in (16, 1):
            with start_server(served, ServingConfig(max_batch=max_batch)) as server:
                result = load_test(server.url, payload, concurrency=config.clients, requests=config.requests,
                                   time_limit_s=600)
            name = f"{precision}, {'batching (16)' if max_batch > 1 else 'one at a time'}"
            rows.append({"server": name, **result.summary()})
            latencies[name] = sorted(result.latencies_s)
    for row in rows:
        row["speedup"] = row["requests_per_s"] / next(r["requests_per_s"] for r in rows if r["server"] == "fp32, one at a time")
    print(f"\n7. {config.requests} completions of {config.max_tokens} tokens from {config.clients} concurrent clients "
          "(python -m minillm serve on 127.0.0.1):\n" + markdown_table(rows, ["server", "ok", "errors", "requests_per_s",
                                                                            "tokens_per_s", "p50_s", "p99_s", "speedup"]))
    plots.plot_curves({name: (values, [(i + 1) / len(values) for i in range(len(values))])
                       for name, values in latencies.items()}, out / "serving_latency.png",
                      title=f"Completion latency, {config.clients} concurrent clients", xlabel="seconds",
                      ylabel="share of requests answered")
    with start_server(load_served_model(classifier_folder, name="classifier")) as server:  # and a classifier
        labels = load_test(server.url, {"texts": ["a gorgeous , witty , seductive movie", "a dull , lifeless mess"]},
                           concurrency=config.clients, requests=config.requests, path="/v1/classify", time_limit_s=600)
    print(f"   /v1/classify, 2 texts a request: {labels.requests_per_s:.1f} requests/s, p99 {labels.p99_s * 1e3:.0f} ms, "
          f"{labels.errors} errors")
    return {"completions": rows, "classify": labels.summary()}


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    runs.check_results_folder(out)
    seed_everything(config.seed)
    print("1. The models: a chapter 06 GPT and a chapter 08 BERT classifier (trained now unless given)")
    gpt_folder, classifier_folder = gpt_run(config, out), classifier_run(config, out)
    print("\n2. Evaluated on held-out data (python -m minillm evaluate --run DIR):")
    evaluations = {name: evaluate_run(folder, limit=64 if config.quick else 0, out=out / f"eval-{name}",
                                      log=lambda m: print("   " + m))
                   for name, folder in (("gpt", gpt_folder), ("classifier", classifier_folder))}
    quantization = quantization_section(gpt_folder, classifier_folder, config, out)
    distillation = distillation_section(classifier_folder, config, out)
    export = export_section(gpt_folder, classifier_folder, out)
    print("\n6. Greedy generation, minillm vs Hugging Face transformers, the same weights in GPT-2's layout:")
    shapes = {"GPT-2 small (124M)": None, "chapter 06's shape (0.8M)": GPTConfig(
        vocab_size=65, block_size=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True)}
    if config.quick:
        shapes = {"tiny": GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)}
    megabytes = 64 if config.quick else 512
    bandwidth = read_bandwidth(megabytes)  # the roofline: one token reads every weight once
    print(f"   this machine reads memory at {bandwidth:.1f} GB/s (a sum over {megabytes} MB)")
    race = []
    for shape_name, shape in shapes.items():
        print(f"   {shape_name}:")
        race += [{"model": shape_name, **r.row()} for r in race_generation(
            shape, new_tokens=config.race_tokens, repeats=1 if config.quick else 5, log=lambda m: print("   " + m))]
    serving = serving_section(gpt_folder, classifier_folder, config, out)
    accuracy = {row["precision"]: row for row in quantization["classifier"]}
    summary = {
        "classifier on SST-2 dev: fp32 / int8 (by hand)": f"{accuracy['fp32']['metric']:.1%} / "
                                                           f"{accuracy['int8 (by hand)']['metric']:.1%}",
        "int8 (by hand) vs fp32: throughput, size": f"{accuracy['int8 (by hand)']['speedup_vs_fp32']:.2f}x, "
                                                    f"{accuracy['int8 (by hand)']['size_vs_fp32']:.2f}x smaller",
        "greedy generation vs transformers (1 / 8 sequences)": "; ".join(
            f"{shape}: " + " / ".join(f"{r['speedup']:.2f}x" for r in race if r["model"] == shape) for shape in shapes),
        "ONNX Runtime vs PyTorch, max |logit difference|": " / ".join(f"{c['max_abs_diff']:.1e}" for c in export.values()),
    }
    results = {"evaluations": evaluations, "quantization": quantization, "distillation": distillation, "export": export,
               "generation_race": race, "read_bandwidth_gb_per_s": bandwidth, "serving": serving, "config": asdict(config), "summary": summary}
    write_json(out / "results.json", results)
    print(f"\nSaved {out / 'results.json'} and the plots in {out}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
