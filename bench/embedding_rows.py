"""What a rows rule on an embedding table saves: a BERT-base-sized vocabulary (30,522 x 768)
in a one-layer BERT classifier, batch 8 x 128 tokens, AdamW, the table and the classifier
trained: the whole table ("full"), the rows each batch looks up ({"rows": "touched"}, a
sparse optimizer's update) and 16 chosen rows (new tokens).

    python -m bench.embedding_rows            # results: bench/results/embedding_rows.json

Peaks are the memory plan's predictions for one step (activations, gradients, optimizer state;
weights and the batch excluded), exact for these buffers. Step times: the three trainers take
turns, one step each, in one process, so a busy spell on the machine slows all alike; the
median of each is reported with its ratio to "full".
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "embedding_rows.json"
TABLE = "bert.embeddings.word_embeddings.weight"
RULES = {"full": "full", "touched": {"rows": "touched"}, "16 rows": {"rows": list(range(1000, 1016))}}
ROUNDS = 12


def main() -> None:
    import torch

    import edgetune as et
    from edgetune.models.hf import tiny_sequence_classifier

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [((torch.randint(1000, 8000, (8, 128), generator=g), torch.ones(8, 128, dtype=torch.int64)),
                (torch.randint(0, 2, (8,), generator=g),)) for _ in range(4)]

    def loss_fn(outputs, labels):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    trainers = {}
    for name, rule in RULES.items():
        model = tiny_sequence_classifier(num_labels=2, vocab_size=30522, hidden_size=768, num_hidden_layers=1,
                                         num_attention_heads=12, intermediate_size=3072, max_position_embeddings=128)
        trainers[name] = et.compile(model, loss_fn, *batches[0], scheme={TABLE: rule, "classifier.*": "full"},
                                    optimizer=et.AdamW(lr=1e-4))
    times = {name: [] for name in trainers}
    for k in range(ROUNDS + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(*batches[k % len(batches)])
            if k:  # the first step of each pays one-off costs
                times[name].append(time.perf_counter() - start)
    full = statistics.median(times["full"])
    results = {name: {"predicted_peak_mb": round(t.plan.peak_bytes / 2 ** 20, 1),
                      "optimizer_state_mb": round(t.plan.state_bytes / 2 ** 20, 1),
                      "trainable_entries": t.trainable_params,
                      "step_ms_median": round(1000 * statistics.median(times[name]), 1),
                      "time_vs_full": round(statistics.median(times[name]) / full, 3)}
               for name, t in trainers.items()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:>8}: {r}")


if __name__ == "__main__":
    main()
