"""CPU cost of the pretrained MiniLM encoder on the mini benchmark's texts: one batch per task,
forward alone and forward + backward (what one step of a test-time-trained method such as
AdaMerging or WEMoE runs per task), on one thread, as CPU time (meaningful on a shared machine).

    python plugins/fusion-minibench/scripts/step_cost.py --batch 16

The batch is the first ``--batch`` test texts of the seed-0 split (random lengths, padded to the
longest, at most 32 tokens); nothing is built or cached.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch
    from fusion_minibench import data, minilm
    from fusion_minibench.batching import inputs
    from fusion_minibench.model import MiniLMEncoder

    torch.set_num_threads(1)
    model = MiniLMEncoder.from_state_dict(minilm.bert_config(6), minilm.pretrained_state(6))
    total_forward = total_backward = 0.0
    for name in data.DEFAULT_TASKS:
        task = data.load_task(name)
        test = data.split_task(task, seed=0, n_train=1000, n_val=200, n_test=300)["test"]
        batch = inputs(minilm.encode([task.texts[i] for i in test[: args.batch]], 32))
        with torch.inference_mode():
            model(**batch)
            start = time.process_time()
            for _ in range(args.repeat):
                model(**batch)
            forward = (time.process_time() - start) / args.repeat
        start = time.process_time()
        for _ in range(args.repeat):
            model(**batch).sum().backward()
        backward = (time.process_time() - start) / args.repeat
        model.zero_grad(set_to_none=True)
        total_forward, total_backward = total_forward + forward, total_backward + backward
        print(f"{name}: {args.batch} texts of {batch['input_ids'].shape[1]} tokens: forward {1000 * forward:.0f} ms, "
              f"forward + backward {1000 * backward:.0f} ms")
    print(f"all {len(data.DEFAULT_TASKS)} tasks, one batch each: forward {total_forward:.2f} s, "
          f"forward + backward {total_backward:.2f} s (CPU time, one thread)")


if __name__ == "__main__":
    main()
