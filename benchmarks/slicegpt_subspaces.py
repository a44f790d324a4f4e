"""Why per-block SliceGPT rotations can lose to one shared rotation: measure the principal subspaces of a model's
residual stream at every block boundary.

For each boundary l (0: the embeddings, L: the last block's output) it prints the fraction of the stream's energy
that the top-``kept`` principal directions keep, with that boundary's own basis (what per-block SliceGPT slices to)
and with the one basis of all boundaries together (``rotation: shared``), and how much consecutive per-block bases
overlap (||A_l^T A_{l+1}||_F^2 / kept; 1 = the same subspace). Then it follows the residual path: the stream at a
boundary carried to the head through every later boundary's projection (per-block: the product of L - l + 1
different projections; shared: one), as the fraction of its energy left.

All on the dense model (no slicing, after the method's rotation-invariant preparation, which keeps its outputs),
so it isolates the choice of bases from the slicing procedure.

    python benchmarks/slicegpt_subspaces.py --model packaged:smollm2-135m --slicing 0.25
"""

from __future__ import annotations

import argparse

import torch

from hf_prune.adapters import ModelAdapter
from hf_prune.calibration.data import calibration_batch
from hf_prune.calibration.engine import BlockwiseEngine
from hf_prune.methods.slicegpt import rotation as R
from hf_prune.methods.slicegpt.method import SliceGPTConfig, SliceGPTMethod
from hf_prune.pruner import load_model_and_tokenizer


def stream_statistics(model, windows: torch.Tensor, keep_at: set[int]):
    """Uncentred covariance (float64, as SliceGPT computes it) of the residual stream at every block boundary, and
    the stream itself at the boundaries in ``keep_at``, from the block-by-block walk the method itself uses."""
    adapter = ModelAdapter(model)
    covs: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}

    def record(index: int, chunks: list[torch.Tensor]) -> None:
        covs.append(SliceGPTMethod._cov(chunks))
        if index in keep_at:
            kept[index] = torch.cat([c.reshape(-1, c.shape[-1]).double() for c in chunks])

    for step in BlockwiseEngine.from_input_ids(model, adapter, windows).walk(desc="stream statistics"):
        record(step.index, step.inputs)
        step.info["outputs"] = step.forward()
        if step.index == adapter.num_blocks - 1:
            record(adapter.num_blocks, step.info["outputs"])
    return covs, kept


def energy_kept(cov: torch.Tensor, basis: torch.Tensor) -> float:
    return (torch.trace(basis.t() @ cov @ basis) / torch.trace(cov)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--slicing", type=float, default=0.25)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib", default="fortunes")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    windows, _ = calibration_batch(args.calib, tokenizer, args.nsamples, args.seqlen, 0)
    hidden = model.config.hidden_size
    kept = R.sliced_dim(hidden, args.slicing)
    adapter = ModelAdapter(model)
    method = SliceGPTMethod(SliceGPTConfig(slicing=args.slicing))
    method.make_rotation_invariant(model, adapter)  # what the method measures on (outputs unchanged)
    starts = sorted({0, adapter.num_blocks // 3, 2 * adapter.num_blocks // 3})
    covs, streams = stream_statistics(model, windows, set(starts))
    per_block = [R.principal_basis(c)[0][:, :kept] for c in covs]
    # rotation: shared's own basis (a second pass, so that this is exactly the basis the method slices to)
    shared = method.shared_basis(BlockwiseEngine.from_input_ids(model, adapter, windows))[:, :kept]

    print(
        f"Model {args.model}; {args.nsamples} x {args.seqlen} tokens of {args.calib}, seed 0; hidden {hidden}, "
        f"kept {kept} ({1 - kept / hidden:.1%} sliced); dense model, no slicing.\n"
    )
    print("| boundary | energy kept, own basis | energy kept, shared basis | overlap with next own basis |")
    print("|---|---|---|---|")
    for i, cov in enumerate(covs):
        overlap = (
            f"{(torch.linalg.matrix_norm(per_block[i].t() @ per_block[i + 1]) ** 2 / kept).item():.3f}"
            if i + 1 < len(covs)
            else "-"
        )
        print(f"| {i} | {energy_kept(cov, per_block[i]):.4f} | {energy_kept(cov, shared):.4f} | {overlap} |")

    print("\n| stream at boundary | energy left at the head, per-block projections | same, shared projection |")
    print("|---|---|---|")
    for start in starts:
        x = streams[start]
        total = (x**2).sum()
        carried = x
        for basis in per_block[start:]:
            carried = carried @ basis @ basis.t()
        print(
            f"| {start} | {((carried**2).sum() / total).item():.3f} | "
            f"{((x @ shared @ shared.t()) ** 2).sum().item() / total.item():.3f} |"
        )
    chain = torch.eye(hidden, dtype=torch.float64)
    for basis in per_block:
        chain = chain @ basis @ basis.t()
    singular = torch.linalg.svdvals(chain)
    print(
        f"\nThe product of all {len(per_block)} per-block projections: {(singular > 0.99).sum().item()} directions "
        f"pass with > 99% of their length, {(singular > 0.5).sum().item()} with > 50% (the shared projection passes "
        f"{kept} intact)."
    )


if __name__ == "__main__":
    main()
