"""One rank of a data-parallel prune, launched by the tests with torchrun: load, prune, save (rank 0 writes).

HF_PRUNE_TEST_RESUME=1 prunes resumably (the recipe's output.dir holds the work folder beside it);
HF_PRUNE_TEST_KILL_AFTER=N ends rank 0's process abruptly right after its N-th block commit, as a kill would;
HF_PRUNE_TEST_RANK1_FREE_BYTES=B makes rank 1 see B bytes of free memory when it sizes its calibration chunks, as a
rank on a busier device would."""

import json
import os
import sys

from hf_prune import HFPruner
from hf_prune.resume import WorkFolder
from hf_prune.utils import setup_logging


def kill_after(commits: int) -> None:
    original, done = WorkFolder.commit_block, {"n": 0}

    def commit_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        done["n"] += 1
        if done["n"] >= commits and os.environ.get("RANK") == "0":
            os._exit(9)

    WorkFolder.commit_block = commit_then_die


def main() -> None:
    setup_logging()
    model, out = sys.argv[1], sys.argv[3]
    with open(sys.argv[2]) as f:
        recipe = json.load(f)
    if os.environ.get("HF_PRUNE_TEST_FAIL_RANK") == os.environ.get("RANK"):
        raise RuntimeError("this rank fails on purpose")
    if os.environ.get("HF_PRUNE_TEST_RANK1_FREE_BYTES") and os.environ.get("RANK") == "1":
        from hf_prune.calibration import engine

        free = int(os.environ["HF_PRUNE_TEST_RANK1_FREE_BYTES"])
        engine.available_memory_bytes = lambda device=None: free
    if os.environ.get("HF_PRUNE_TEST_KILL_AFTER"):
        kill_after(int(os.environ["HF_PRUNE_TEST_KILL_AFTER"]))
    pruner = HFPruner.from_pretrained(model, recipe=recipe)
    pruner.prune(resume=os.environ.get("HF_PRUNE_TEST_RESUME") == "1")
    pruner.save_pretrained(out)


if __name__ == "__main__":
    main()
