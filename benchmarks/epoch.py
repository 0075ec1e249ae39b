"""One epoch of LoRA training: length-bucketed batches against padding every row to 128, and their matmul FLOPs."""

from __future__ import annotations

import random
import statistics

from data import LengthBucketSampler, bucket_key

from .harness import forward_matmul_flops, model_shapes, run_worker


def bench_epoch(args, rows) -> list[dict]:
    """2: an epoch of LoRA training with length-bucketed dynamic padding vs every row padded to 128.

    Beside the times, the matmul FLOPs each plan computes (padding included; 2 x forward for a LoRA step)
    and those of an epoch with no padding at all: the compute ratio bounds what batching can gain.
    """
    shapes = model_shapes(args.model)

    def epoch_tflop(plan, pad_to=None):
        flops = 0
        for batch in plan:
            source = pad_to or max(len(rows[i].input_ids) for i in batch)
            target = pad_to or max(len(rows[i].labels) for i in batch)
            flops += 2 * forward_matmul_flops(shapes, source * len(batch), target * len(batch))
        return flops / 1e12

    lengths = [len(r.input_ids) + len(r.labels) for r in rows]
    bucketed = LengthBucketSampler([bucket_key(r) for r in rows], args.batch_size, seed=0).all_batches(0)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    padded = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    results = []
    for name, plan, pad_to in (("bucketed, dynamic padding", bucketed, None), ("every row padded to 128", padded, 128)):
        sample = plan if args.full_epoch else random.Random(1).sample(plan, min(args.epoch_sample, len(plan)))
        spec = {
            "model": args.model,
            "mode": "lora",
            "tokenizer": args.tokenizer,
            "warmup": args.warmup,
            "batches": sample,
            "pad_to": pad_to,
        }
        out = run_worker(spec, in_process=args.quick)
        # Real (non-padding) tokens of the whole epoch are the same for both plans.
        epoch_s = statistics.mean(out["times"]) * len(plan)
        results.append(
            {
                "plan": name,
                "batches": len(plan),
                "measured_batches": len(sample),
                "epoch_s": epoch_s,
                "real_tokens_per_s": sum(lengths) / epoch_s,
                "matmul_tflop": epoch_tflop(plan, pad_to),
            }
        )
    results.append(
        {
            "plan": "no padding at all (computed only)",
            "batches": "-",
            "measured_batches": "-",
            "epoch_s": None,
            "real_tokens_per_s": None,
            "matmul_tflop": epoch_tflop([[i] for i in range(len(rows))]),
        }
    )
    return results
