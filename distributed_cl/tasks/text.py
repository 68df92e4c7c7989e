"""Text task: pairs of texts (WordNet's definition and example sentence, or your own anchor and
positive) through one shared transformer tower, evaluated by anchor -> positive retrieval over
the held-out pairs, and by kNN over their labels where the rows have labels."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import Field, PositiveInt
from torch import Tensor, nn

from distributed_cl.data.table import Splits, Table
from distributed_cl.data.wordnet import load_wordnet
from distributed_cl.evaluate import knn_top1, recall_at_k, sharded_embed
from distributed_cl.model_card import Export
from distributed_cl.models import TextTokenizer, TextTower, save_sentence_transformer
from distributed_cl.models.text import SENTENCE_TRANSFORMER_DIR, TextTowerOptions
from distributed_cl.options import Options, absolute
from distributed_cl.tasks.base import Config, Task, pair_extras, to_device


class TextOptions(Options):
    """The `text` section: WordNet (definition, example sentence) pairs, supersense labels for
    SupCon, and the text tower (which your own text data uses too)."""

    root: str = "/usr/share/wordnet"  # Debian wordnet-base
    heldout_synsets: int = Field(2000, ge=2)  # evaluation pool: definition -> example retrieval among these
    max_train_pairs: PositiveInt | None = None  # keep only the first N training pairs (tiny runs)
    eval_bank_size: PositiveInt = 2000  # training definitions that vote in the supersense kNN evaluation
    tower: TextTowerOptions = Field(default_factory=TextTowerOptions)

    def absolute_paths(self) -> TextOptions:
        return self.model_copy(update={"root": absolute(self.root)})


class SiameseText(nn.Module):
    """One tower embeds both sides (as sentence-transformers fine-tunes MiniLM): no head, so the
    embeddings the loss trains are the ones evaluated and exported."""

    def __init__(self, tower: TextTower, lr_mult: float = 1.0) -> None:
        super().__init__()
        self.tower, self.lr_mult = tower, lr_mult

    def lr_mults(self) -> list[tuple[list[nn.Parameter], float]]:
        return [(list(self.tower.parameters()), self.lr_mult)]

    def architecture(self) -> dict:
        return {"text": self.tower.architecture()}

    def forward(self, tokens_a: dict, tokens_b: dict) -> tuple[Tensor, Tensor]:
        return self.tower(tokens_a), self.tower(tokens_b)

    def embed_b(self, tokens: dict) -> Tensor:
        """Texts of side b's kind (the rows' hard negatives)."""
        return self.tower(tokens)


class TextTask(Task):
    """Metrics: recall@1 and @10 of anchor -> positive retrieval over the held-out pool, and, for
    labelled rows, the held-out anchors' label predicted by their k nearest training anchors
    (`supersense_knn_top1` on WordNet, what SupCon on supersenses trains for; `knn_top1` on yours)."""

    name = "text"
    builtin_data = "wordnet"
    sections = {"text": TextOptions}
    sides = ("text", "text")
    builtin_labelled = True

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu", data: Splits | None = None) -> None:
        super().__init__(config, rank, world, device, data)
        self.tokenize = self.tokenizer(config)

    @classmethod
    def tokenizer(cls, config: Config) -> TextTokenizer:
        return TextTokenizer(config.text.tower)

    @staticmethod
    def encode(towers: SiameseText, side: str, values, tokenize, device) -> Tensor:
        return towers.tower(to_device(tokenize(values, side), device))  # one tower for both sides, each its prompt

    @staticmethod
    def builtin(config: Config) -> Splits:
        """WordNet (definition, example sentence) pairs labelled by supersense."""
        x = config.text
        data = load_wordnet(x.root, x.heldout_synsets, seed=config.train.seed, max_train_pairs=x.max_train_pairs)
        train, test = (Table(p.anchors, p.positives, p.labels, labelled=True) for p in (data.train, data.test))
        return Splits(train, test, bank=train.head(x.eval_bank_size), train_rows=len(train))

    @classmethod
    def check_files(cls, config: Config) -> None:
        x = config.text
        if config.dataset is None and not Path(x.root, "data.noun").is_file():
            raise FileNotFoundError(f"text.root: no WordNet database at {x.root} (apt-get install wordnet-base, "
                                    "or point text.root at a WordNet 3.0 dict directory)")
        x.tower.check("text.tower")

    @classmethod
    def knn_metric(cls, config: Config) -> str | None:
        if not cls.labelled(config):
            return None
        return "supersense_knn_top1" if config.dataset is None else "knn_top1"  # WordNet's labels are supersenses

    @classmethod
    def metric_names(cls, config: Config) -> tuple[str, ...]:
        return ("recall@1", "recall@10") + ((cls.knn_metric(config),) if cls.labelled(config) else ())

    def collate(self, rows: Table) -> dict:  # each side of the batch tokenised in one call
        return {"a": self.tokenize(rows.a, "a"), "b": self.tokenize(rows.b, "b"), "labels": rows.labels,
                **pair_extras(rows, functools.partial(self.tokenize, side="b"))}

    @staticmethod
    def build_towers(config: Config, architecture: dict | None = None) -> SiameseText:
        tower = TextTower(config.text.tower, None if architecture is None else architecture["text"])
        return SiameseText(tower, config.text.tower.lr_mult)

    def _embed(self, towers: SiameseText, texts: list[str]) -> Tensor:
        return sharded_embed(lambda chunk: self.encode(towers, "a", chunk, self.tokenize, self.device), texts,
                             self.rank, self.world, self.device)

    def evaluate(self, towers: SiameseText) -> dict[str, float]:
        test, bank = self.data.test.matching(), self.data.bank
        anchors = self._embed(towers, test.a)
        recall = recall_at_k(anchors, self._embed(towers, test.b), (1, 10))
        metrics = {"recall@1": recall[1], "recall@10": recall[10]}
        if self.labelled(self.config):
            bank_anchors = self._embed(towers, bank.a)
            metrics[self.knn_metric(self.config)] = knn_top1(bank_anchors, bank.labels, anchors, test.labels, self.config.train.knn_k)
        return metrics

    def baselines(self) -> dict[str, float]:
        test = self.data.test.matching()
        n = len(test)
        chance = {"recall@1_baseline": 1 / n, "recall@10_baseline": min(1.0, 10 / n)}
        if self.labelled(self.config):  # the majority label
            chance[f"{self.knn_metric(self.config)}_baseline"] = test.labels.unique(return_counts=True)[1].max().item() / n
        return chance

    def export(self, towers: SiameseText, directory: str) -> None:
        super().export(towers, directory)
        # SentenceTransformer(path), and a transformers directory too: AutoModel.from_pretrained(path)
        save_sentence_transformer(towers.tower, self.tokenize, os.path.join(directory, SENTENCE_TRANSFORMER_DIR))

    def exports(self, towers: nn.Module) -> list[Export]:
        load = ('from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer("{path}")\n'
                'embeddings = model.encode(["A first sentence.", "Another one."])  # L2-normalised; cosine similarity')
        return [Export(SENTENCE_TRANSFORMER_DIR, "sentence-transformers", "sentence-similarity", load,
                       "sentence-transformers model"), *super().exports(towers)]

    @property
    def base_model(self) -> str | None:
        return self.config.text.tower.model
