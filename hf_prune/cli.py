"""``hf-prune``: the command line over the same Python API.

    hf-prune prune --model M --method wanda --sparsity 0.5 --structure 2:4 --nsamples 32 --seqlen 512 --seed 0 \\
                   --calib fortunes --output out/m-wanda
    hf-prune run configs/wanda_2of4.yaml
    hf-prune ppl --model out/m-wanda --text wikipedia --seqlen 512 --max-windows 32
    hf-prune demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .errors import HFPruneError
from .utils import setup_logging

RESUME_HELP = (
    "keep a work folder beside the output (.NAME.work) with every finished block (and the model after every "
    "finished structural step); run the same command again after a kill to continue from there"
)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "dtype", None):
        import torch

        kwargs["dtype"] = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if getattr(args, "device_map", None):
        kwargs["device_map"] = args.device_map
    if getattr(args, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    if getattr(args, "revision", None):
        kwargs["revision"] = args.revision
    return kwargs


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="local folder, Hub id, or packaged:<name>")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="weights dtype when loading")
    p.add_argument("--device-map", help="accelerate device_map, e.g. auto, cpu, cuda:0 (then --device is not used)")
    p.add_argument(
        "--device",
        help="where to run: auto (default: the GPU/accelerator if torch sees one, else the CPU), cpu, cuda, cuda:1",
    )
    p.add_argument(
        "--onload",
        action="store_true",
        default=None,
        help="keep the weights in host memory and bring one block at a time onto the device (default: only when "
        "the model does not fit)",
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true")


def _placement_into(recipe: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """--device / --onload into a recipe dict (a device_map dispatch keeps its own placement)."""
    if args.device:
        recipe["device"] = args.device
    if args.onload:
        recipe["onload"] = True
    return recipe


def _step_from_args(args: argparse.Namespace) -> dict[str, Any]:
    step: dict[str, Any] = {"method": args.method}
    if args.sparsity is not None:
        step["sparsity"] = args.sparsity
    if args.structure:
        step["structure"] = args.structure
    if args.targets:
        step["targets"] = args.targets
    if args.ignore:
        step["ignore"] = args.ignore
    if args.reconstruct:
        step["reconstruct"] = True
    for kv in args.set or []:
        key, _, value = kv.partition("=")
        if not _:
            raise HFPruneError(f"--set expects key=value, got {kv!r}")
        import yaml

        step[key] = yaml.safe_load(value)
    return step


def _check_before_loading(model: str | None, output: str | None, overwrite: bool) -> None:
    """The model source and the output folder, before minutes of loading and calibration."""
    from .checkpoint import check_model_source, check_output_dir

    if model:
        check_model_source(model)
    if output:
        check_output_dir(output, overwrite, [model])


def _finish(
    pruner, recipe, output: str | None, overwrite: bool, report_json: str | None, resume: bool = False
) -> None:
    from . import distributed
    from .resume import work_folder_for

    out = output or recipe.output.dir
    if resume and not out:
        raise HFPruneError("--resume keeps its work folder beside the output: give --output (or output.dir).")
    report = pruner.prune(resume=resume, work_dir=work_folder_for(out) if resume else None)
    if recipe.heal is not None:
        pruner.heal()
    if distributed.is_main():  # under torchrun every rank holds the same result; rank 0 speaks and writes
        print(report.to_markdown())
        if report_json:
            report.to_json(report_json)
    if out:
        path = pruner.save_pretrained(out, overwrite=overwrite or recipe.output.overwrite)
        if distributed.is_main():
            print(f"Saved pruned model to {path}")


def _streaming(
    recipe, model: str, output: str | None, overwrite: bool, report_json: str | None, resume: bool = False
) -> None:
    from .pruner import resolve_model_path
    from .streaming import prune_streaming

    if not output:
        raise HFPruneError("Streaming writes the pruned checkpoint as it goes: give --output (or output.dir).")
    report = prune_streaming(resolve_model_path(model), recipe, output, overwrite=overwrite, resume=resume)
    print(report.to_markdown())
    if report_json:
        report.to_json(report_json)
    print(f"Saved pruned model to {output}")


def cmd_prune(args: argparse.Namespace) -> None:
    from .pruner import HFPruner
    from .recipe import Recipe

    recipe_dict: dict[str, Any] = {
        "model": args.model,
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seed": args.seed},
        "steps": [_step_from_args(args)],
    }
    if args.seqlen:
        recipe_dict["calibration"]["seqlen"] = args.seqlen
    if args.batch_size:
        recipe_dict["calibration"]["batch_size"] = args.batch_size
    if args.eval:
        recipe_dict["eval"] = {"source": args.eval_text, "seqlen": args.eval_seqlen, "max_windows": args.eval_windows}
    _placement_into(recipe_dict, args)
    recipe = Recipe.from_dict(recipe_dict)
    _check_before_loading(args.model, args.output, args.overwrite)
    if args.streaming:
        return _streaming(recipe, args.model, args.output, args.overwrite, args.report_json, args.resume)
    pruner = HFPruner.from_pretrained(args.model, recipe=recipe, **_model_kwargs(args))
    _finish(pruner, recipe, args.output, args.overwrite, args.report_json, args.resume)


def cmd_run(args: argparse.Namespace) -> None:
    from .pruner import HFPruner
    from .recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe)
    if args.model:
        recipe.model = args.model
    if args.device or args.onload:
        recipe = Recipe.from_dict(_placement_into(recipe.to_dict(), args))
    _check_before_loading(recipe.model, args.output or recipe.output.dir, args.overwrite or recipe.output.overwrite)
    if recipe.output.streaming:
        return _streaming(
            recipe,
            recipe.model,
            args.output or recipe.output.dir,
            args.overwrite or recipe.output.overwrite,
            args.report_json,
            args.resume,
        )
    pruner = HFPruner.from_pretrained(recipe.model, recipe=recipe, **_model_kwargs(args))
    _finish(pruner, recipe, args.output, args.overwrite, args.report_json, args.resume)


def cmd_ppl(args: argparse.Namespace) -> None:
    from . import placement
    from .adapters import ModelAdapter
    from .eval.perplexity import PERPLEXITY_CONVENTION, perplexity
    from .pruner import load_model_and_tokenizer

    _check_before_loading(args.model, None, False)
    model, tokenizer = load_model_and_tokenizer(args.model, **_model_kwargs(args))
    place = placement.plan(
        model, ModelAdapter(model), args.device, onload=bool(args.onload) or "auto", nsamples=1, seqlen=args.seqlen
    )
    placement.apply(model, place)
    place.log()
    ppl = perplexity(model, tokenizer, args.text, args.seqlen, args.max_windows, args.batch_size)
    result = {
        "model": args.model,
        "text": args.text,
        "seqlen": args.seqlen,
        "max_windows": args.max_windows,
        "perplexity": ppl,
        "convention": PERPLEXITY_CONVENTION,
    }
    print(
        json.dumps(result, indent=2)
        if args.json
        else f"perplexity {ppl:.4f}  ({args.text}, seqlen {args.seqlen}, first {args.max_windows} windows)"
    )


def cmd_push(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .hub import push_folder

    if not Path(args.model).is_dir():
        raise HFPruneError(f"push uploads a saved model folder; {args.model} is not a folder here.")
    _check_before_loading(args.model, None, False)

    url = push_folder(
        args.model,
        args.repo_id,
        private=args.private or None,
        token=args.token,
        revision=args.revision,
        commit_message=args.message,
    )
    print(f"Pushed {args.model} to {args.repo_id}: {url}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.harness import SHIPPED_TASKS, run_lm_eval
    from .pruner import resolve_model_path

    _check_before_loading(args.model, None, False)
    model_args = {"trust_remote_code": True} if args.trust_remote_code else {}
    if args.revision:
        model_args["revision"] = args.revision
    results = run_lm_eval(
        resolve_model_path(args.model),
        None,
        args.tasks or SHIPPED_TASKS,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        model_args=model_args,
    )
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
        return
    print(f"\n{args.model}\n\n| task | metric | value |\n|---|---|---|")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                print(f"| {task} | {metric} | {value:.4f} |")


def cmd_vlm_harness(args: argparse.Namespace) -> None:
    from .checkpoint import atomic_write_folder, check_output_dir
    from .vlm.harness import build_llava_smollm2

    check_output_dir(args.output, args.overwrite, [])
    model, processor = build_llava_smollm2()

    def write(tmp):
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    out = atomic_write_folder(args.output, write, args.overwrite)
    print(f"Saved the LLaVA-style harness (SmolLM2-135M + RANDOM vision tower: untrained visual features) to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(output_root=args.output, quick=args.quick)


def cmd_methods(args: argparse.Namespace) -> None:
    from .registry import available_methods, get_method

    for name in available_methods():
        doc = (get_method(name).method_cls.__doc__ or "").strip().splitlines()
        print(f"{name:12s} {doc[0] if doc else ''}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Post-training pruning of Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model with one method")
    _add_model_args(p)
    p.add_argument("--method", required=True, help="magnitude, wanda, ... (hf-prune methods)")
    p.add_argument("--sparsity", type=float, help="fraction of weights removed per target linear, in [0, 1)")
    p.add_argument("--structure", help="unstructured (default) or N:M such as 2:4")
    p.add_argument("--targets", nargs="+", help="roles (q k v o gate up down ...) or regexes to prune")
    p.add_argument("--ignore", nargs="+", help="roles or regexes to leave dense")
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit each block's surviving weights to the dense block's outputs (masks fixed); settings with "
        "--set 'reconstruct={epochs: 4}'",
    )
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="other step keys, e.g. --set true_sequential=false")
    p.add_argument("--calib", default="fortunes", help="calibration text: built-in name, file/folder, or dataset id")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default min(2048, model max))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration samples per block forward (default: automatic)")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    p.add_argument("--eval-text", default="wikipedia")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--output", help="folder to save the pruned model into")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--report-json", help="also write the report as JSON here")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument(
        "--streaming",
        action="store_true",
        help="prune a local safetensors checkpoint block by block without loading the whole model",
    )
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("run", help="run a YAML recipe")
    p.add_argument("recipe", help="path of the recipe (configs/*.yaml)")
    _add_model_args(p, required=False)
    p.add_argument("--output", help="override the recipe's output.dir")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--report-json")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ppl", help="perplexity of a model on a text")
    _add_model_args(p)
    p.add_argument("--text", default="wikipedia", help="built-in name, file/folder, or dataset id")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32, help="first N windows (0 = all)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("push", help="push a saved pruned model folder to the Hub with a model card")
    p.add_argument("--model", required=True, help="the saved folder (hf-prune prune --output ...)")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="write token (default: logged-in token / HF_TOKEN)")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("eval", help="lm-evaluation-harness on a saved folder or Hub id")
    p.add_argument("--model", required=True, help="folder, Hub id or packaged:<name>")
    p.add_argument("--tasks", nargs="+", help="lm-eval tasks (default: the shipped offline Wikipedia tasks)")
    p.add_argument("--limit", type=float, help="examples per task (count, or fraction < 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available)")
    p.add_argument("--revision")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="prune the packaged SmolLM2 with Wanda 50%% and 2:4 and print a table")
    p.add_argument("--output", default="out/demo", help="where the demo saves its models")
    p.add_argument("--quick", action="store_true", help="8 x 256 calibration tokens and 8 eval windows")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("vlm-harness", help="save the offline LLaVA-style test model (SmolLM2 + random vision tower)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_vlm_harness)

    p = sub.add_parser("methods", help="list the pruning methods")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_windows", None) == 0:
        args.max_windows = None
    from . import distributed

    distributed.init_from_env()
    level = logging.DEBUG if args.verbose else logging.INFO
    setup_logging(level if distributed.is_main() else logging.WARNING)
    try:
        args.func(args)
    except HFPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
