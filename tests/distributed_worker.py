"""One rank of a data-parallel prune, launched by the tests with torchrun: load, prune, save (rank 0 writes)."""

import json
import os
import sys

from hf_prune import HFPruner


def main() -> None:
    model, out = sys.argv[1], sys.argv[3]
    with open(sys.argv[2]) as f:
        recipe = json.load(f)
    if os.environ.get("HF_PRUNE_TEST_FAIL_RANK") == os.environ.get("RANK"):
        raise RuntimeError("this rank fails on purpose")
    pruner = HFPruner.from_pretrained(model, recipe=recipe)
    pruner.prune()
    pruner.save_pretrained(out)


if __name__ == "__main__":
    main()
