"""BERT pretraining: masked language modelling and next-sentence prediction (Devlin et al., 2019).

::

    python -m minillm pretrain bert --out runs/bert        # IMDB's 50,000 unlabelled reviews (the default)

- :func:`bert_corpus`: documents of sentences (IMDB's unlabelled reviews, SST-2's phrases, or a text file),
  split into train and validation, and a WordPiece (or BPE) tokenizer trained on the training text.
- :func:`bert_task`: ``[CLS] A [SEP] B [SEP]`` next-sentence pairs (:func:`minillm.data.nsp_pairs`) as a
  :class:`BertPretrainingTask` for the shared loop, masked 80/10/10 (:func:`minillm.data.mask_tokens`).
- :func:`pretrain_bert`: the whole run from a :class:`BertPretrainConfig`; :func:`evaluate_bert` its
  held-out masked-LM and next-sentence accuracy; :func:`fill_in` what the model puts in a ``[MASK]``.
"""

from __future__ import annotations

import pathlib
import random
from array import array
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from minillm import MinillmError, data, datasets, runs
from minillm.bert import BertConfig, BertForPreTraining
from minillm.device import seed_everything
from minillm.files import read_json, write_json
from minillm.tokenization import (
    load_library_tokenizer,
    save_library_tokenizer,
    special_token_ids,
    train_library_bpe,
    train_wordpiece,
)
from minillm.train import ExampleDraws, Task, TrainConfig, Trainer


@dataclass
class BertBatch:
    input_ids: torch.Tensor  # (B, T), masked
    token_type_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    mlm_labels: torch.Tensor  # (B, T), original ids where masked, -100 elsewhere
    next_sentence_label: torch.Tensor  # (B,), 0 = B follows A, 1 = B is random

    def to(self, device) -> "BertBatch":
        return BertBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))



class BertPretrainingTask(Task):
    """Pretraining batches for :class:`~minillm.bert.BertForPreTraining`, for :class:`~minillm.train.Trainer`.

    Examples are ``[CLS] A [SEP] B [SEP]`` pairs with next-sentence labels (:func:`minillm.data.nsp_pairs`).
    A training batch is drawn at random (pairs of similar length together, :class:`~minillm.train.LengthBuckets`,
    which makes a CPU step 2.3x faster on SST-2; ``length_grouping=0`` draws uniformly), padded, and
    masked (:func:`minillm.data.mask_tokens`):
    with ``dynamic_masking`` afresh every time it is drawn (RoBERTa, Liu et al., 2019), otherwise
    once per example, up front (BERT's static masking). Validation examples are masked once, with a
    fixed seed, so every estimate scores the same predictions. Under data parallelism every process
    builds and masks the whole global batch (the same random draws everywhere) and keeps its rows.
    """

    loss_unit = "masked-LM nats/token + next-sentence nats/pair"

    def __init__(self, train_examples, val_examples, *, pad_id: int, mask_id: int, vocab_size: int,
                 special_ids, mlm_probability: float = 0.15, dynamic_masking: bool = True,
                 continuation_ids=None, seed: int = 0, length_grouping: int = 16):
        if not train_examples or not val_examples:
            raise MinillmError("BERT pretraining needs at least one training and one validation sentence pair")
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.pad_id, self.mask_id, self.vocab_size = pad_id, mask_id, vocab_size
        self.special_ids, self.mlm_probability, self.dynamic_masking = sorted(special_ids), mlm_probability, dynamic_masking
        # Whole-word masking: a vocabulary-sized table, True for WordPiece continuations ("##ing").
        self.continuation = None
        if continuation_ids is not None:
            self.continuation = torch.zeros(vocab_size, dtype=torch.bool)
            self.continuation[list(continuation_ids)] = True
        masking = torch.Generator().manual_seed(seed)
        self.static_train = None if dynamic_masking else [self._mask(self._pad([e]), masking) for e in self.train_examples]
        self.val_batches_cache: dict[int, list[BertBatch]] = {}
        self.val_seed = seed + 1
        # Batches of similar-length pairs (0: uniform draws): buckets of length_grouping global batches.
        self.draw = ExampleDraws([len(ids) for ids, _, _ in self.train_examples], length_grouping, seed)
        # Validation in length order: the same examples and masks, a fraction of the padding.
        self.val_examples.sort(key=lambda example: len(example[0]))

    def _pad(self, examples) -> BertBatch:
        padded = data.pad_batch([ids for ids, _, _ in examples], pad_id=self.pad_id,
                                token_type_ids=[types for _, types, _ in examples])
        labels = torch.full_like(padded["input_ids"], -100)
        return BertBatch(padded["input_ids"], padded["token_type_ids"], padded["attention_mask"], labels,
                         torch.tensor([label for _, _, label in examples], dtype=torch.long))

    def _mask(self, batch: BertBatch, generator: torch.Generator) -> BertBatch:
        word_starts = None if self.continuation is None else ~self.continuation[batch.input_ids]
        masked, labels = data.mask_tokens(batch.input_ids, self.mask_id, self.vocab_size, self.special_ids,
                                          self.mlm_probability, generator=generator, word_starts=word_starts)
        return BertBatch(masked, batch.token_type_ids, batch.attention_mask, labels, batch.next_sentence_label)

    def sample_batch(self, batch_size: int, generator: torch.Generator, device, rank: int = 0, world_size: int = 1):
        indices = self.draw(batch_size * world_size, generator)
        if self.dynamic_masking:
            batch = self._mask(self._pad([self.train_examples[i] for i in indices]), generator)
        else:  # the masks made up front, re-padded to this batch's longest example
            chosen = [self.static_train[i] for i in indices]
            length = max(b.input_ids.shape[1] for b in chosen)
            pad = lambda t, fill: F.pad(t, (0, length - t.shape[1]), value=fill)  # noqa: E731
            batch = BertBatch(torch.cat([pad(b.input_ids, self.pad_id) for b in chosen]),
                              torch.cat([pad(b.token_type_ids, 0) for b in chosen]),
                              torch.cat([pad(b.attention_mask, 0) for b in chosen]),
                              torch.cat([pad(b.mlm_labels, -100) for b in chosen]),
                              torch.cat([b.next_sentence_label for b in chosen]))
        rows = slice(rank * batch_size, (rank + 1) * batch_size)  # this process's share of the global batch
        return BertBatch(*(getattr(batch, name)[rows] for name in BertBatch.__dataclass_fields__)).to(device)

    @staticmethod
    def loss(model, batch: BertBatch) -> torch.Tensor:
        return model(batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.mlm_labels,
                     batch.next_sentence_label, mlm_positions="masked").loss

    def eval_batches(self, batch_size: int, device, max_batches: int | None = None):
        if batch_size not in self.val_batches_cache:
            generator = torch.Generator().manual_seed(self.val_seed)
            self.val_batches_cache[batch_size] = [
                self._mask(self._pad(self.val_examples[start:start + batch_size]), generator)
                for start in range(0, len(self.val_examples), batch_size)]
        batches = self.val_batches_cache[batch_size]
        for batch in batches[:max_batches]:
            yield batch.to(device)

    @staticmethod
    def batch_tokens(batch: BertBatch) -> int:
        return int(batch.attention_mask.sum())



@torch.no_grad()
def evaluate_bert(model, task: BertPretrainingTask, device, batch_size: int = 64) -> dict:
    """Masked-LM loss and accuracy (over the masked positions) and next-sentence accuracy on the
    whole validation set, masked with the task's fixed seed."""
    model.eval()
    mlm_loss = mlm_correct = mlm_count = nsp_correct = nsp_count = 0.0
    for batch in task.eval_batches(batch_size, device):
        out = model(batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.mlm_labels,
                    batch.next_sentence_label, mlm_positions="masked")
        targets = batch.mlm_labels[batch.mlm_labels != -100]
        mlm_loss += out.mlm_loss.item() * len(targets)
        mlm_correct += (out.mlm_logits.argmax(-1) == targets).sum().item()
        mlm_count += len(targets)
        nsp_correct += (out.nsp_logits.argmax(-1) == batch.next_sentence_label).sum().item()
        nsp_count += len(batch.next_sentence_label)
    model.train()
    return {"mlm_loss": mlm_loss / mlm_count, "mlm_accuracy": mlm_correct / mlm_count,
            "nsp_accuracy": nsp_correct / nsp_count, "masked_tokens": int(mlm_count), "pairs": int(nsp_count)}



@dataclass
class BertPretrainConfig(TrainConfig):
    """Pretrain a BERT (masked LM + next-sentence prediction) on IMDB's unlabelled reviews, SST-2's phrases or a text file."""

    out: str = field(default="runs/bert", metadata={"help": "run folder: tokenizer, checkpoints, log.jsonl, loss.png, results"})
    data: str = field(default="imdb", metadata={"help": "what to pretrain on: 'imdb' (the 50,000 unlabelled movie reviews, "
                                                       "one document each, cut into sentences), 'sst2' (SST-2's training "
                                                       "phrases, labels dropped), or a UTF-8 text file (documents: blocks "
                                                       "of lines separated by blank lines; each line a sentence)"})
    tokenizer: Literal["wordpiece", "bpe"] = field(default="wordpiece", metadata={"help": "WordPiece (BERT's) or byte-level BPE, "
                                                                                         "trained on the training text"})
    vocab_size: int = field(default=8000, metadata={"help": "tokenizer vocabulary size"})
    val_fraction: float = field(default=0.02, metadata={"help": "fraction of documents drawn for validation (IMDB: ~1,000 "
                                                                "reviews; for --data sst2 use ~0.1: ~1 in 9 survives the leak check)"})
    max_length: int = field(default=128, metadata={"help": "tokens per [CLS] A [SEP] B [SEP] example (and the model's positions)"})
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens selected for masked-LM prediction"})
    dynamic_masking: bool = field(default=True, metadata={"help": "re-mask every time an example is drawn (RoBERTa); "
                                                                 "--no-dynamic-masking masks once (BERT)"})
    whole_word: bool = field(default=False, metadata={"help": "mask whole words, all their WordPiece pieces together"})
    n_layer: int = field(default=4, metadata={"help": "encoder layers"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    n_embd: int = field(default=128, metadata={"help": "hidden size"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability (BERT: 0.1; 0 by default here: on a CPU its "
                                                           "random masks cost half a step, and a 3-epoch run barely overfits)"})
    batch_size: int = field(default=32, metadata={"help": "sentence pairs per micro-batch, per process (32 x ~100 tokens: on a "
                                                               "CPU more steps of fewer pairs learn more in the same minutes)"})
    max_iters: int = field(default=3000, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_iters: int = field(default=200, metadata={"help": "steps of linear warmup"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (BERT's)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (BERT's)"})
    eval_interval: int = field(default=500, metadata={"help": "estimate the validation loss every N steps (and checkpoint)"})
    QUICK = {"max_iters": 20, "eval_interval": 10, "eval_iters": 2, "n_layer": 1, "n_head": 2, "n_embd": 32,
             "batch_size": 8, "warmup_iters": 4, "vocab_size": 600, "max_length": 32, "progress": False, "sst2_limit": 3000,
             "review_limit": 400, "val_fraction": 0.1}
    sst2_limit: int = field(default=0, metadata={"help": "use only the first N SST-2 phrases (0: all)"})
    review_limit: int = field(default=0, metadata={"help": "use only the first N unlabelled IMDB reviews (0: all)"})

    def validate(self):
        super().validate()
        for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if self.max_length < 5:
            raise ValueError(f"--max-length must be at least 5 ([CLS] A [SEP] B [SEP]), got {self.max_length}")
        if not 0.0 < self.mlm_probability < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ValueError("--mlm-probability and --val-fraction must be between 0 and 1")
        if self.whole_word and self.tokenizer != "wordpiece":
            raise ValueError("--whole-word needs --tokenizer wordpiece (its ## pieces mark words)")
        if self.vocab_size < 300 and self.tokenizer == "bpe":
            raise ValueError("--vocab-size must be at least 300 for byte-level BPE (256 bytes + specials)")

    def model_config(self, vocab_size: int, pad_id: int) -> BertConfig:
        return BertConfig(vocab_size=vocab_size, max_len=self.max_length, n_layer=self.n_layer, n_head=self.n_head,
                          n_embd=self.n_embd, dropout=self.dropout, pad_id=pad_id)



def fill_in(model, tokenizer, sentence: str, k: int = 5, device="cpu") -> list[tuple[str, float]]:
    """The ``k`` most likely tokens for the one ``[MASK]`` in ``sentence``, with their probabilities
    p(w | context) = softmax(mlm_logits at the [MASK] position)_w, from a BertForPreTraining."""
    if sentence.count("[MASK]") != 1:
        raise MinillmError(f"the sentence must hold exactly one [MASK], got {sentence.count('[MASK]')}: {sentence!r}")
    special = special_token_ids(tokenizer)
    before, after = sentence.split("[MASK]")
    ids = [special.cls, *tokenizer.encode(before).ids, special.mask, *tokenizer.encode(after).ids, special.sep]
    if len(ids) > model.config.max_len:
        raise MinillmError(f"the sentence is {len(ids)} tokens long, more than the model's {model.config.max_len}")
    position = ids.index(special.mask)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).mlm_logits[0, position]  # (vocab,)
    model.train(was_training)
    probs, top = torch.softmax(logits.float(), -1).topk(k)
    return [(tokenizer.id_to_token(i), p) for i, p in zip(top.tolist(), probs.tolist())]



def bert_documents(config: BertPretrainConfig) -> tuple[list, list, list[str], str]:
    """``(train_docs, val_docs, extra_text, source)``: the documents (lists of segment strings), split into train
    and validation, the extra text the tokenizer also learns from, and a description of the data.

    ``--data imdb`` (the default): the unlabelled IMDB reviews (:func:`minillm.datasets.pretraining_reviews`:
    none of them is an IMDB test review), each a document of its sentences (:func:`minillm.data.split_sentences`),
    a seeded random ``val_fraction`` of the reviews held out; SST-2's training phrases are the extra text, so that
    the words chapter 08's data use are pieces of the vocabulary.
    ``--data sst2``: SST-2's training phrases cut in two (:func:`minillm.data.sst2_documents`), held out leak-free.
    A path: a text file's blocks between blank lines, each line a segment."""
    extra_text: list[str] = []
    if config.data == "sst2":
        phrases = datasets.read_sst2("train")[0][: config.sst2_limit or None]
        train_phrases, val_phrases = datasets.leak_free_split(phrases, config.val_fraction, seed=config.seed)
        documents = None
        train_docs = data.sst2_documents(train_phrases, seed=config.seed)
        val_docs = data.sst2_documents(val_phrases, seed=config.seed + 1)
        source = "SST-2 training phrases (labels dropped)"
    elif config.data == "imdb":
        reviews = datasets.pretraining_reviews(limit=config.review_limit)
        documents = data.review_documents(reviews)
        extra_text = datasets.read_sst2("train")[0]
        source = f"{len(reviews):,} unlabelled IMDB reviews"
    else:
        documents = data.text_documents(data.read_text_file(config.data))
        source = config.data
    if documents is not None:
        order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_val = max(2, round(len(documents) * config.val_fraction))
        val_docs = [documents[i] for i in order[:n_val]]
        train_docs = [documents[i] for i in order[n_val:]]
    if len(train_docs) < 2 or len(val_docs) < 2:
        raise MinillmError(f"{source} has too few documents for next-sentence pairs ({len(train_docs)} train, {len(val_docs)} "
                           "val): a text file's documents are blocks of lines separated by blank lines")
    return train_docs, val_docs, extra_text, source


def bert_corpus(config: BertPretrainConfig, log=print):
    """Documents (lists of segment strings), split into train and validation (:func:`bert_documents`), and the
    tokenizer, trained on the training documents (and the extra text)."""
    train_docs, val_docs, extra_text, source = bert_documents(config)
    train_text = [segment for document in train_docs for segment in document] + extra_text
    trainer = train_wordpiece if config.tokenizer == "wordpiece" else train_library_bpe
    tokenizer = trainer(train_text, config.vocab_size)
    log(f"{source}: {len(train_docs):,} training / {len(val_docs):,} validation documents; {config.tokenizer} "
        f"tokenizer of {tokenizer.get_vocab_size():,} tokens" + (" (trained with SST-2's phrases too)" if extra_text else ""))
    return tokenizer, train_docs, val_docs


def bert_task(config: BertPretrainConfig, tokenizer, train_docs, val_docs) -> BertPretrainingTask:
    """Next-sentence pairs of the documents, masked as ``config`` says. Except for SST-2 (whose two
    segments are the halves of one phrase), consecutive sentences are first packed into segments of up
    to half an example (:func:`minillm.data.pack_segments`), as BERT fills its examples."""
    special = special_token_ids(tokenizer)
    half = (config.max_length - 3) // 2  # [CLS] A [SEP] B [SEP]: A and B share what the three specials leave

    typecode = "H" if tokenizer.get_vocab_size() <= 2**16 else "I"  # ids as C arrays: 2 bytes each, not ~36 in a list

    def encode(documents):
        flat = [segment for document in documents for segment in document]
        ids = iter([array(typecode, encoding.ids) for start in range(0, len(flat), 20_000)  # in slices: an Encoding
                    for encoding in tokenizer.encode_batch(flat[start:start + 20_000])])  # holds much more than ids
        encoded = [[next(ids) for _ in document] for document in documents]
        return encoded if config.data == "sst2" else [data.pack_segments(document, half) for document in encoded]

    pairs = {}
    for name, documents, seed in (("train", train_docs, config.seed), ("val", val_docs, config.seed + 1)):
        examples = data.nsp_pairs(encode(documents), config.max_length, cls_id=special.cls, sep_id=special.sep,
                                  generator=random.Random(seed))
        pairs[name] = [(array(typecode, ids), array("B", types), label) for ids, types, label in examples]
        del examples
    continuation = None
    if config.whole_word:
        continuation = [i for token, i in tokenizer.get_vocab().items() if token.startswith("##")]
    return BertPretrainingTask(pairs["train"], pairs["val"], pad_id=special.pad, mask_id=special.mask,
                               vocab_size=tokenizer.get_vocab_size(), special_ids=list(special),
                               mlm_probability=config.mlm_probability, dynamic_masking=config.dynamic_masking,
                               continuation_ids=continuation, seed=config.seed)



def pretrain_bert(config: BertPretrainConfig, stop_after: int | None = None, log=print) -> dict:
    """The whole command: check the run folder, build the corpus and tokenizer, pretrain, evaluate."""
    out = pathlib.Path(config.out)
    runs.check_run_folder(out, config.resume, config.overwrite, kind="bert")
    seed_everything(config.seed)
    tokenizer, train_docs, val_docs = bert_corpus(config, log)
    if config.resume:  # the run's own tokenizer, so the ids mean what they meant
        tokenizer = load_library_tokenizer(out / runs.TOKENIZER)
    task = bert_task(config, tokenizer, train_docs, val_docs)
    model_config = config.model_config(tokenizer.get_vocab_size(), special_token_ids(tokenizer).pad)
    model = BertForPreTraining(model_config)
    log(f"{len(task.train_examples):,} training / {len(task.val_examples):,} validation sentence pairs, "
        f"{'dynamic' if config.dynamic_masking else 'static'}{', whole-word' if config.whole_word else ''} masking")
    run_info = runs.run_info("bert", model_config, data=config.data)
    trainer = Trainer(model, task, config, run_info, log=log)
    result = trainer.fit(stop_after=stop_after, prepare=lambda folder: save_library_tokenizer(tokenizer, folder / runs.TOKENIZER))
    if np.isnan(result.val_loss):
        return {"result": result}
    metrics = evaluate_bert(model, task, trainer.device)
    log(f"held-out: masked-LM loss {metrics['mlm_loss']:.3f}, accuracy {metrics['mlm_accuracy']:.1%} over "
        f"{metrics['masked_tokens']:,} masked tokens; next-sentence accuracy {metrics['nsp_accuracy']:.1%} over "
        f"{metrics['pairs']:,} pairs")
    if trainer.dist.is_main:
        write_json(out / runs.RESULTS, {**read_json(out / runs.RESULTS), **metrics})
    return {"result": result, **metrics, "model": model, "tokenizer": tokenizer, "task": task}


def chapter07_pretraining(settings: TrainConfig, log=print) -> Callable[[pathlib.Path], dict]:
    """``pretrain(folder)``: chapter 07's default BERT run (its quick one under ``--quick``) into ``folder``, on
    ``settings``' device and precision: what :func:`minillm.runs.bert_run` calls for ``--bert pretrain``."""
    def pretrain(folder: pathlib.Path) -> dict:
        log(f"Pretraining a BERT first (chapter 07's {'quick' if settings.quick else 'default'} run) into {folder}")
        return pretrain_bert(BertPretrainConfig(out=str(folder), overwrite=True, quick=settings.quick, device=settings.device,
                                                precision=settings.precision,
                                                activation_checkpointing=settings.activation_checkpointing,
                                                **(BertPretrainConfig.QUICK if settings.quick else {})), log=log)

    return pretrain
