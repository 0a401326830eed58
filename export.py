"""Export a trained model to the runtimes people deploy: openai .pt, transformers, PEFT, CTranslate2/faster-whisper.

    python export.py --model offline:base --adapter amdo=runs/amdo --to ct2 --out amdo-ct2 --quantization int8
    python export.py --model offline:base --adapter amdo=runs/amdo --to openai --out amdo.pt
    python export.py --model offline:base --adapter amdo=runs/amdo --to hf --out amdo-hf
    python export.py --model offline:base --adapter amdo=runs/amdo --to peft --out amdo-peft
    python export.py --model offline:base --adapter amdo=runs/amdo --adapter kham=runs/kham \
        --adapter mix=amdo@0.5+kham@0.5 --to ct2 --out mix-ct2          # a composition of adapters, merged
    python export.py --checkpoint runs/full --to ct2 --out full-ct2     # a fully fine-tuned model

The last --adapter given is the one exported (merged into the base, except for --to peft, which writes the
adapter alone); earlier ones can be the ingredients of a composition NAME=A@w+B@w (lora/compose.py). Every
export records the base's fingerprint and what was merged into it: OUT/export.json beside a directory format,
and a "whisper_ft" entry inside an openai .pt. An adapter trained on another base is refused in one line.
"""
import argparse
import json
import os
import sys
import time

from lora.adapters import export_peft, merge_and_unload, set_active_adapter
from lora.rows import rows_modules
from scoring.systems import checkpoint_spec, load_systems, parse_adapters
from training.setup import choose_device, load_base
from whisper_ft.convert import CT2_QUANTIZATIONS, openai_to_hf_name
from whisper_ft.models import ModelSpecError, export_ct2, export_hf, export_openai, fingerprint
from whisper_ft.vocab import forget_rowless_tokens

FORMATS = ("openai", "hf", "peft", "ct2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="offline:base", help="base model spec (see whisper_ft/models.py)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH|NAME=A@w+B@w",
                   help="LoRA adapter file or train.py run directory, or a composition of named ones; repeatable, "
                        "the last one is exported")
    p.add_argument("--checkpoint", default=None, help="a fully fine-tuned model (.pt or a train.py run directory) "
                                                       "to export instead of --model")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="a .pt file for --to openai, else a directory")
    p.add_argument("--quantization", default=None, choices=CT2_QUANTIZATIONS,
                   help="CTranslate2 weights (--to ct2 only; default float32)")
    p.add_argument("--mix-rank", type=int, default=None, help="truncate a composition to this rank by SVD")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quantization and args.to != "ct2":
        p.error(f"--quantization is for --to ct2 only (--to {args.to} writes float32)")
    if args.to == "peft" and not args.adapter:
        p.error("--to peft writes an adapter: give one with --adapter NAME=PATH")
    if args.to == "openai" and os.path.isdir(args.out):
        p.error(f"--out {args.out} is a directory: --to openai writes one file, e.g. --out model.pt")
    if args.to != "openai" and os.path.isfile(args.out):
        p.error(f"--out {args.out} is a file: --to {args.to} writes a directory")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    named = [v if "=" in v else f"adapter={v}" for v in args.adapter]  # a bare PATH is named "adapter"
    adapters, mixes = parse_adapters(named)
    spec = checkpoint_spec(args.checkpoint) if args.checkpoint else args.model
    model, base_fp = load_base(spec, choose_device(args.device))
    built = load_systems(model, base_fp, adapters, mixes, mix_rank=args.mix_rank)
    target = named[-1].partition("=")[0] if named else None
    record = {"format": args.to, "quantization": args.quantization or ("float32" if args.to == "ct2" else None),
              "base_model": spec, "base_fingerprint": base_fp, "adapter": target,
              "adapter_file": adapters.get(target), "composition": built.get(target),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else list(argv)}
    if args.to == "peft":
        if rows_modules(model, target):
            raise SystemExit(f"error: --to peft: adapter {target} added tokens (--add-tokens), which PEFT's LoRA files "
                             f"cannot hold yet; export the merged model with --to openai")
        set_active_adapter(model, target)
        export_peft(model, args.out, target, module_name_map=openai_to_hf_name, base_model_name_or_path=spec)
        files = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        if target is not None:
            merge_and_unload(model, target)
            forget_rowless_tokens(model)
        record["merged_fingerprint"] = fingerprint(model)
        if args.to == "openai":
            export_openai(model, args.out, metadata=record)
            files = []
        elif args.to == "hf":
            files = export_hf(model, args.out)
        else:
            files = export_ct2(model, args.out, record["quantization"])
    if files:
        with open(os.path.join(args.out, "export.json"), "w") as f:
            json.dump(record, f, indent=2)
    print(f"exported {spec}" + (f" + adapter {target}" if target else "") + f" to {args.to}: {args.out}"
          + (f" ({', '.join(files + ['export.json'])})" if files else ""))
    if args.to in ("hf", "ct2") and "tokenizer.json" not in files:
        print("note: no tokenizer.json ships for this model's vocabulary (only the multilingual 99-language one "
              "does); faster-whisper / transformers fetch the tokenizer of the matching openai/whisper-* model "
              "from the hub, or copy its tokenizer.json into the directory")
    if args.to == "peft":
        print("PEFT applies it on the transformers export of the same base: python export.py --model "
              f"{spec} --to hf --out BASE_HF")
    return record


if __name__ == "__main__":
    try:
        main()
    except ModelSpecError as e:
        sys.exit(f"error: {e}")
