"""Systems: what a model is decoded as. The names and files users pass (--adapter, --route, --checkpoint),
checked before any work, and the adapters (files and compositions) loaded into the base.
"""
import os

from lora.adapters import AdapterMismatchError, audio_ctx_of, load_adapter, read_adapter_metadata
from lora.compose import compose, parse_mix
from lora.inject import remove_adapter, set_active_adapter
from lora.layers import check_adapter_name
from scoring.evaluation import evaluate_systems
from whisper_ft.dialect_id import load_dialect_id
from whisper_ft.decoding import PRECISIONS
from whisper_ft.encoder import AUDIO_CTX_HELP, audio_ctx_value
from whisper_ft.vocab import adapter_tokens, set_added_tokens

RESERVED = ("base", "routed", "routed-auto")


def parse_adapters(values) -> tuple[dict, dict]:
    """--adapter values -> ({name: adapter file}, {name: [(adapter name, weight or None)]} for compositions).

    NAME=PATH names a file (or a train.py run directory holding adapter.safetensors); NAME=A@0.5+B@0.5 names a
    composition of adapters given by their names (lora/compose.py); without weights it is uniform, or fitted
    with --fit-data. Everything is checked here, before any model is loaded.
    """
    adapters, mixes = {}, {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --adapter {v!r}: expected NAME=PATH, e.g. amdo=runs/amdo/adapter.safetensors")
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise SystemExit(f"error: --adapter {v!r}: {e}") from None
        if name in adapters or name in mixes or name in RESERVED:
            raise SystemExit(f"error: --adapter {name}: duplicate or reserved name ({', '.join(RESERVED)} are systems)")
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter.safetensors")):
            path = os.path.join(path, "adapter.safetensors")  # a train.py run directory
        if os.path.isfile(path):
            adapters[name] = path
        elif "+" in path or "@" in path:
            try:
                mixes[name] = parse_mix(path)
            except ValueError as e:
                raise SystemExit(f"error: --adapter {v}: {e}") from None
        else:
            raise SystemExit(f"error: --adapter {name}={path}: no such file")
    for name, terms in mixes.items():
        unknown = [t for t, _ in terms if t not in adapters]
        if unknown:
            raise SystemExit(f"error: --adapter {name}: {unknown[0]!r} is not an adapter file given by --adapter "
                             f"NAME=PATH (they are {sorted(adapters) or 'none'})")
    return adapters, mixes


def load_systems(model, base_fp: str, adapters: dict, mixes: dict, *, mix_rank=None, fit=None) -> dict:
    """Load the adapter files into `model`, then build each composition; returns {mix name: its weights, rank,
    energy kept}. `fit(model, name, terms)`, when given, returns the weights of a composition given without them.
    Adapters that added tokens (--add-tokens) give the model their vocabulary; one run holds one such vocabulary."""
    tokens = added_vocabulary(adapters)
    for name, path in adapters.items():
        try:
            load_adapter(model, path, name, base_fingerprint=base_fp, activate=False)
        except (AdapterMismatchError, ValueError, KeyError) as e:
            raise SystemExit(f"error: --adapter {name}={path}: {e}") from None
    if tokens:
        set_added_tokens(model, tokens)
    built = {}
    for name, terms in mixes.items():
        if terms[0][1] is not None:
            weights = dict(terms)
        elif fit is not None:
            weights = fit(model, name, [t for t, _ in terms])
        else:
            weights = {t: 1 / len(terms) for t, _ in terms}
        energy = compose(model, name, weights, rank=mix_rank)
        built[name] = {"weights": weights, "rank": mix_rank, "energy_kept": min(energy.values())}
        print(f"composed {name} = " + " + ".join(f"{w:.3f} x {t}" for t, w in weights.items())
              + (f", rank {mix_rank} (min energy kept {min(energy.values()):.3f})" if mix_rank else " (exact)"))
    return built


def added_vocabulary(adapters: dict) -> tuple:
    """The tokens the adapters added to the vocabulary (() for none); one line when two added different ones."""
    found = {}
    for name, path in adapters.items():
        try:
            tokens = adapter_tokens(read_adapter_metadata(path)["user_metadata"])
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --adapter {name}={path}: {e}") from None
        if tokens:
            found[name] = tokens
    if len(set(found.values())) > 1:
        a, b = list(found)[:2]
        raise SystemExit(f"error: --adapter {a} and --adapter {b} added different tokens to the vocabulary "
                         f"({len(found[a])} and {len(found[b])}, --add-tokens): decode them in separate runs")
    return next(iter(found.values()), ())


def parse_routes(values, adapters: dict) -> dict:
    routes = {}
    for v in values:
        dialect, sep, name = v.partition("=")
        if not sep or not dialect or not name:
            raise SystemExit(f"error: --route {v!r}: expected DIALECT=ADAPTER, e.g. amdo=amdo_r16")
        if name not in adapters:
            raise SystemExit(f"error: --route {v}: unknown adapter name {name!r}; the --adapter names are "
                             f"{sorted(adapters) or 'none'}")
        routes[dialect] = name
    return routes


def parse_audio_ctx(value: str):
    """--audio-ctx: "full", "auto", "auto+N" or an even number of frames <= 3000; one line otherwise."""
    try:
        return audio_ctx_value(value)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def trained_audio_ctx(adapters: dict) -> str:
    """The encoder context the adapters were trained with (a model decodes best as it was trained: README), when
    they agree; "full" without adapters. One line asking for --audio-ctx when they differ."""
    found = {}
    for name, path in adapters.items():
        try:
            found[name] = audio_ctx_of(path)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --adapter {name}={path}: {e}") from None
    if len(set(found.values())) > 1:
        raise SystemExit(f"error: the adapters were trained with different --audio-ctx ({found}): pass --audio-ctx "
                         "to choose the one to decode with")
    ctx = next(iter(found.values()), "full")
    if adapters:
        print(f"audio ctx {ctx}: as the adapters were trained (--audio-ctx overrides)")
    return ctx


def checkpoint_spec(path: str) -> str:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.pt")):
        return os.path.join(path, "model.pt")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter.safetensors")):
        raise SystemExit(f"error: --checkpoint {path} is a LoRA run: pass --adapter NAME={path}/adapter.safetensors")
    looks_like_path = os.sep in path or path.endswith(".pt")
    if looks_like_path and not os.path.exists(path):
        raise SystemExit(f"error: --checkpoint {path}: no such file or directory")
    return path


def system_name(path: str) -> str:
    """A checkpoint's system name: its file name, or its run directory's for RUN/model.pt."""
    name = os.path.basename(os.path.normpath(path))
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if name == "model.pt" else name.removesuffix(".pt")


def fit_mix(model, terms: list[str], dataset, collator, tokenizer, *, language: str, device="cpu",
            batch_size: int = 16, step: float = 0.25, min_step: float = 0.0625) -> tuple[dict, list]:
    """Weights on the simplex (w >= 0, sum 1) for the composition of `terms` with the lowest CER on `dataset`
    (a handful of labelled clips of the new dialect): gradient-free pattern search from the best of the single
    adapters and the uniform mix, moving `step` of weight from one adapter to another, halving the step when no
    move helps. Returns (weights, [(weights, cer)] of every candidate scored)."""
    tried = {}

    def cer(weights):
        key = tuple(round(weights[t], 6) for t in terms)
        if key not in tried:
            compose(model, "_fit", {t: w for t, w in weights.items() if w > 0})
            res, _ = evaluate_systems(model, dataset, collator, tokenizer, {"fit": lambda d: set_active_adapter(model, "_fit")},
                                      language=language, batch_size=batch_size, device=device)
            remove_adapter(model, "_fit")
            tried[key] = res["fit"]["_micro"]["cer"]
        return tried[key]

    starts = [{t: float(t == s) for t in terms} for s in terms] + [{t: 1 / len(terms) for t in terms}]
    best = min(starts, key=cer)
    while step >= min_step:
        moves = [{**best, a: best[a] + step, b: best[b] - step} for a in terms for b in terms
                 if a != b and best[b] - step >= -1e-9]
        better = [m for m in moves if cer(m) < cer(best)]
        if better:
            best = min(better, key=cer)
        else:
            step /= 2
    return best, [(dict(zip(terms, k)), v) for k, v in tried.items()]


def add_routing_args(p, unit: str, what: str) -> None:
    """--dialect-id and the flags of routing by it (evaluate.py routes each clip, transcribe.py each recording)."""
    p.add_argument("--dialect-id", default=None, metavar="PATH",
                   help=f"dialect-ID head (dialect_id.safetensors, or a train.py --task dialect-id run directory): {what}")
    p.add_argument("--route-threshold", type=float, default=None, metavar="P",
                   help=f"a {unit} whose predicted dialect has probability under P goes to --route-fallback (default 0)")
    p.add_argument("--route-fallback", default=None, metavar="base|mix|NAME",
                   help=f"the system for a {unit} with no adapter for its predicted dialect or under the threshold: "
                        "base, mix (uniform composition of the --adapter files), or an --adapter name (default mix)")


def add_decoding_args(p) -> None:
    """--audio-ctx and --precision, as evaluate.py and transcribe.py both take them."""
    p.add_argument("--audio-ctx", default=None,
                   help=AUDIO_CTX_HELP + " (default: what the adapters were trained with, else full)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: the encoder and cross-attention under bf16 autocast (~1.8x faster at 30 s windows on "
                        "a CPU with avx512_bf16, same text on 16/16 bench clips; bench/README.md)")


def check_dialect_id(dialect_id, route_threshold, route_fallback, adapters: dict) -> dict | None:
    """{path, threshold, fallback} of --dialect-id and its routing flags (evaluate.py's and transcribe.py's), or
    None without --dialect-id."""
    if dialect_id is None:
        given = [f for f, v in (("--route-threshold", route_threshold), ("--route-fallback", route_fallback))
                 if v is not None]
        if given:
            raise SystemExit(f"error: {given[0]} is for routed-auto: add --dialect-id PATH (a dialect-ID head)")
        return None
    path = dialect_id
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dialect_id.safetensors")):
        path = os.path.join(path, "dialect_id.safetensors")  # a train.py --task dialect-id run directory
    if not os.path.isfile(path):
        raise SystemExit(f"error: --dialect-id {dialect_id}: no such file (pass the dialect_id.safetensors of a "
                         "train.py --task dialect-id run, or its run directory)")
    threshold = 0.0 if route_threshold is None else route_threshold
    if not 0 <= threshold <= 1:
        raise SystemExit(f"error: --route-threshold {threshold}: must be a probability in [0, 1]")
    fallback = route_fallback or "mix"
    if fallback not in ("base", "mix") and fallback not in adapters:
        raise SystemExit(f"error: --route-fallback {fallback}: expected base, mix or an --adapter name "
                         f"({', '.join(sorted(adapters)) or 'none given'})")
    return {"path": path, "threshold": threshold, "fallback": fallback}


def load_head(spec: dict | None, base_fp: str, device):
    """The --dialect-id head (None without it); one line when it is not one, or is for another base."""
    if spec is None:
        return None
    try:
        head = load_dialect_id(spec["path"], base_fingerprint=base_fp, device=device)
    except ValueError as e:
        raise SystemExit(f"error: --dialect-id: {e}") from None
    print(f"dialect ID {spec['path']}: labels {head.labels}, {head.n_layers} encoder blocks")
    return head


def label_routes(model, head, routes: dict, names, files, spec: dict, system: str) -> tuple[dict, str]:
    """How `system` routes by a dialect-ID head: ({label: adapter name}, the fallback system). A label goes to the
    adapter --route names for it, else to the adapter named after it; the fallback "mix" (where no --adapter is
    called mix) is the uniform composition of the adapter files, composed into `model` here under that name."""
    route = {d: routes.get(d, d) for d in head.labels if routes.get(d, d) in names}
    fallback = spec["fallback"]
    if fallback == "mix" and "mix" not in names:
        compose(model, "mix", {a: 1 / len(files) for a in files})
    print(f"{system}: " + ", ".join(f"{d} -> {route.get(d, fallback)}" for d in head.labels)
          + f"; below probability {spec['threshold']:g}: {fallback}")
    return route, fallback
