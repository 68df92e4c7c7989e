"""Text task: WordNet (definition, example sentence) pairs through a shared transformer tower,
evaluated by definition -> example retrieval over held-out synsets."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.utils.data import DataLoader

from distributed_cl.config import Config
from distributed_cl.data.wordnet import load_wordnet
from distributed_cl.evaluate import knn_top1, recall_at_k, sharded_embed
from distributed_cl.models import TextTokenizer, TextTower
from distributed_cl.tasks.base import Task, to_device


class SiameseText(nn.Module):
    """One tower embeds both sides (as sentence-transformers fine-tunes MiniLM): no head, so the
    embeddings the loss trains are the ones evaluated and exported."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, tokens_a: dict, tokens_b: dict) -> tuple[Tensor, Tensor]:
        return self.tower(tokens_a), self.tower(tokens_b)


class TextTask(Task):
    """Metrics: recall@1 and @10 of definition -> example retrieval over the held-out pool, and
    supersense_knn_top1, the held-out definitions' supersense predicted by their k nearest
    training definitions (what SupCon on supersenses trains for)."""

    name = "text"
    metric_names = ("recall@1", "recall@10", "supersense_knn_top1")

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu") -> None:
        super().__init__(config, rank, world, device)
        x = config.text
        self.data = load_wordnet(x.root, x.heldout_synsets, seed=config.train.seed, max_train_pairs=x.max_train_pairs)
        self.tokenize = TextTokenizer(x.tower)

    @property
    def train_labels(self) -> Tensor:
        return self.data.train.labels  # supersenses, for SupCon

    def train_batches(self, batch_sampler: Iterable[list[int]]) -> DataLoader:
        train = self.data.train

        def collate(indices: list[int]) -> dict:  # each side of the batch tokenised in one call
            return {"a": self.tokenize([train.anchors[i] for i in indices]),
                    "b": self.tokenize([train.positives[i] for i in indices]),
                    "labels": train.labels[indices]}

        return self.loader(batch_sampler, collate)

    @staticmethod
    def build_towers(config: Config) -> SiameseText:
        return SiameseText(TextTower(config.text.tower))

    def _embed(self, tower: TextTower, texts: list[str]) -> Tensor:
        return sharded_embed(lambda chunk: tower(to_device(self.tokenize(chunk), self.device)), texts,
                             self.rank, self.world, self.device)

    def evaluate(self, towers: SiameseText) -> dict[str, float]:
        train, test = self.data.train, self.data.test
        definitions = self._embed(towers.tower, test.anchors)
        recall = recall_at_k(definitions, self._embed(towers.tower, test.positives), (1, 10))
        bank = self._embed(towers.tower, train.anchors[: self.config.text.eval_bank_size])
        supersense = knn_top1(bank, train.labels[: len(bank)], definitions, test.labels, self.config.train.knn_k)
        return {"recall@1": recall[1], "recall@10": recall[10], "supersense_knn_top1": supersense}

    def baselines(self) -> dict[str, float]:
        n, labels = len(self.data.test), self.data.test.labels
        return {"recall@1_baseline": 1 / n, "recall@10_baseline": min(1.0, 10 / n),  # chance
                "supersense_knn_top1_baseline": labels.bincount().max().item() / n}  # the majority supersense

    def export(self, towers: SiameseText, directory: str) -> None:
        super().export(towers, directory)
        # a standard transformers directory: AutoModel.from_pretrained(...) + mean pooling
        towers.tower.transformer.save_pretrained(f"{directory}/text_encoder")
        self.tokenize.tokenizer.save_pretrained(f"{directory}/text_encoder")
