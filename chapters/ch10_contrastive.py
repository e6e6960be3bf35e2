"""Chapter 10: contrastive learning of sentence embeddings (InfoNCE, unsupervised SimCSE).

Takes a BERT pretrained by masked language modelling (the one minillm ships, or chapter 07's run with
--bert), and trains it further with SimCSE (Gao et al., 2021): every SST-2 training sentence,
labels unused, is encoded twice with dropout on, and the InfoNCE loss pulls the two views together and
pushes the other sentences of the batch away. Frozen embeddings of SST-2 dev sentences are scored before
and after by two probes trained on the training sentences' labels (nearest centroid, logistic regression),
and drawn in 2-D (PCA), coloured by sentiment.

    python chapters/ch10_contrastive.py                    # the shipped BERT: a few minutes on a 2-core CPU
    python chapters/ch10_contrastive.py --bert runs/ch07   # chapter 07's BERT instead
    python chapters/ch10_contrastive.py --quick            # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, field

from minillm import datasets, runs
from minillm.bert import BertForPreTraining
from minillm.bert_pretraining import chapter07_pretraining
from minillm.config import run_chapter
from minillm.contrastive import SimCSEConfig, pca_2d, plot_embeddings_2d, probe_encoder, set_dropout, simcse_task
from minillm.device import describe_device, pick_device, seed_everything
from minillm.files import read_json, write_json
from minillm.finetune import encode_for_bert
from minillm.tokenization import save_library_tokenizer, special_token_ids
from minillm.train import Trainer


@dataclass
class Config(SimCSEConfig):
    """Chapter 10: SimCSE sentence embeddings from a BERT, scored by probes on SST-2 dev before and after."""

    out: str = field(default="runs/ch10", metadata={"help": "run folder; a run already there is kept: --resume continues it, --overwrite replaces it"})
    bert: str = field(default="shipped", metadata={"help": "the BERT to start from: 'shipped' (pretrained for hours on "
                                                           "IMDB's reviews, data/pretrained), 'pretrain' (chapter 07's "
                                                           "recipe, now, into <out>/bert_pretraining) or a run folder"})


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    device = pick_device(config.device)
    runs.check_run_folder(out, config.resume, config.overwrite, kind="bert-encoder")  # before any work: a run there is kept
    print(f"Running on {describe_device(device, config.precision)}")

    # 1. A BERT pretrained by masked LM + next-sentence prediction, and its WordPiece tokenizer.
    bert_run = runs.bert_run(config.bert, out / "bert_pretraining", chapter07_pretraining(config))
    pretrained, tokenizer, _ = runs.load_run(bert_run, expect="bert")
    pad = special_token_ids(tokenizer).pad
    max_length = min(config.max_length, pretrained.config.max_len)

    # 2. SST-2: the training split's full sentences (labels only for the probes) and the dev sentences.
    train_text, dev_text = datasets.sst2_sentences(config.sst2_limit)
    train, dev = encode_for_bert(tokenizer, train_text, max_length), encode_for_bert(tokenizer, dev_text, max_length)
    task = simcse_task(config, [ids for ids, _ in train], pad)  # the text only: SimCSE never sees a label
    print(f"SST-2: {len(train):,} training sentences ({len(task.val)} held out for SimCSE's validation loss), "
          f"{len(dev):,} dev sentences")

    # 3. Probes before: an untrained encoder of the same shape, and the pretrained one.
    def probe(encoder):
        return probe_encoder(encoder.to(device), train, dev, pad, config.pooling, device, config.probe_l2)

    seed_everything(config.seed)
    scores = {"random init": probe(BertForPreTraining(pretrained.config).bert), "MLM-pretrained": probe(pretrained.bert)}

    # 4. SimCSE: two dropout views per sentence, InfoNCE with in-batch negatives, the shared loop.
    encoder = set_dropout(pretrained.bert, config.dropout)
    encoder.pooler.requires_grad_(config.pooling == "pooler")  # unused otherwise: nothing to train (or to sync under DDP)
    run_info = runs.run_info("bert-encoder", encoder.config, pooling=config.pooling, init=str(bert_run))
    result = Trainer(encoder, task, config, run_info).fit(
        prepare=lambda folder: save_library_tokenizer(tokenizer, folder / runs.TOKENIZER))
    scores["+ SimCSE"] = probe(encoder)

    # 5. Report, and a picture of the dev embeddings before and after.
    positive = sum(y for _, y in dev)
    print(f"\nSST-2 dev ({len(dev)} sentences; majority class {max(positive, len(dev) - positive) / len(dev):.1%}), "
          f"probes trained on {len(train):,} training sentences' labels, {config.pooling} embeddings:")
    print(f"  {'encoder':<16}{'nearest centroid':>18}{'logistic regr.':>16}{'mean cosine':>13}{'uniformity':>12}")
    for name, s in scores.items():
        print(f"  {name:<16}{s['nearest_centroid']:>18.1%}{s['logistic_regression']:>16.1%}{s['mean_cosine']:>13.3f}{s['uniformity']:>12.3f}")
    y_dev = [y for _, y in dev]
    panels = {f"{name} (2 PCs: {share.sum():.0%} of the variance)": (points, y_dev) for name in ("MLM-pretrained", "+ SimCSE")
              for points, share in [pca_2d(scores[name]["test_embeddings"], return_variance=True)]}
    plot_embeddings_2d(panels, out / "embeddings_pca.png", title=f"SST-2 dev sentences, {config.pooling} embeddings, PCA")

    before, after = scores["MLM-pretrained"], scores["+ SimCSE"]
    summary = {
        "SST-2 dev, nearest-centroid probe: random init / pretrained / + SimCSE":
            " / ".join(f"{s['nearest_centroid']:.1%}" for s in scores.values()),
        "SST-2 dev, logistic-regression probe: random init / pretrained / + SimCSE":
            " / ".join(f"{s['logistic_regression']:.1%}" for s in scores.values()),
        "mean cosine between dev sentences, before -> after": f"{before['mean_cosine']:.3f} -> {after['mean_cosine']:.3f}",
        "SimCSE validation loss (InfoNCE), steps, time": f"{result.val_loss:.4f}, {result.steps:,}, {result.seconds:.0f} s",
    }
    probes = {name: {k: v for k, v in s.items() if k != "test_embeddings"} for name, s in scores.items()}
    write_json(out / "results.json", {**read_json(out / "results.json"), "probes": probes, "encoder": str(bert_run),
                                      "config": asdict(config), "summary": summary})
    print(f"\nSaved {out / 'embeddings_pca.png'}, {out / 'loss.png'}, the SimCSE weights and {out / 'results.json'}")
    return {"probes": probes, "summary": summary, "result": result}


if __name__ == "__main__":
    run_chapter(main, Config)
