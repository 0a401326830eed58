"""State-dict conversion between openai-whisper, Hugging Face transformers and CTranslate2.

openai-whisper is the model we train; the other two are how most weights are published.
Every function here maps names and splits/fuses tensors only: values are never changed, so a
round trip is exact (CTranslate2 key biases excepted, see `_split_qkv`).
"""
import json
import re
import struct

import numpy as np
import torch


class ConversionError(ValueError):
    """A model file or directory that cannot be read as a Whisper model; the message says why."""


# --- openai <-> Hugging Face ----------------------------------------------------------------------

# (openai pattern, HF pattern) for the parts inside a block; `{a}` is the attention kind.
_BLOCK_PARTS = [
    ("attn.query", "self_attn.q_proj"), ("attn.key", "self_attn.k_proj"),
    ("attn.value", "self_attn.v_proj"), ("attn.out", "self_attn.out_proj"),
    ("attn_ln", "self_attn_layer_norm"),
    ("cross_attn.query", "encoder_attn.q_proj"), ("cross_attn.key", "encoder_attn.k_proj"),
    ("cross_attn.value", "encoder_attn.v_proj"), ("cross_attn.out", "encoder_attn.out_proj"),
    ("cross_attn_ln", "encoder_attn_layer_norm"),
    ("mlp.0", "fc1"), ("mlp.2", "fc2"), ("mlp_ln", "final_layer_norm"),
]
_TOP = [
    ("encoder.conv1", "model.encoder.conv1"), ("encoder.conv2", "model.encoder.conv2"),
    ("encoder.positional_embedding", "model.encoder.embed_positions.weight"),
    ("encoder.ln_post", "model.encoder.layer_norm"),
    ("decoder.token_embedding", "model.decoder.embed_tokens"),
    ("decoder.positional_embedding", "model.decoder.embed_positions.weight"),
    ("decoder.ln", "model.decoder.layer_norm"),
]


_BLOCK = {"openai": r"(encoder|decoder)\.blocks\.(\d+)\.(.+)", "hf": r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)"}
_BLOCK_NAME = {"openai": "{side}.blocks.{i}.", "hf": "model.{side}.layers.{i}."}


def _rename(name: str, src: str, dst: str) -> str | None:
    """Map a parameter or module name from one naming (`openai` / `hf`) to the other; None if unknown."""
    col = {"openai": 0, "hf": 1}
    m = re.fullmatch(_BLOCK[src], name)
    if m:
        side, i, rest = m.groups()
        for pair in _BLOCK_PARTS:
            ours, theirs = pair[col[src]], pair[col[dst]]
            if rest == ours or rest.startswith(ours + "."):
                return _BLOCK_NAME[dst].format(side=side, i=i) + theirs + rest[len(ours):]
    for pair in _TOP:
        ours, theirs = pair[col[src]], pair[col[dst]]
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return None


def openai_to_hf_name(name: str) -> str:
    """`decoder.blocks.1.cross_attn.value.weight` -> `model.decoder.layers.1.encoder_attn.v_proj.weight`.

    Also maps module names (no `.weight` suffix), which is what PEFT adapter export needs.
    """
    out = _rename(name, "openai", "hf")
    if out is None:
        raise ConversionError(f"no Hugging Face name for openai-whisper parameter {name!r}")
    return out


def hf_to_openai_name(name: str) -> str:
    if not name.startswith("model."):  # WhisperModel checkpoints lack the ForConditionalGeneration prefix
        name = "model." + name
    out = _rename(name, "hf", "openai")
    if out is None:
        raise ConversionError(f"unexpected parameter {name!r} in a Hugging Face Whisper checkpoint")
    return out


def openai_to_hf_state(state: dict) -> dict:
    return {openai_to_hf_name(k): v for k, v in state.items()}


def hf_to_openai_state(state: dict) -> dict:
    # proj_out is tied to embed_tokens in every Whisper; openai-whisper has no separate copy.
    return {hf_to_openai_name(k): v for k, v in state.items() if not k.startswith("proj_out.")}


def dims_from_hf_config(cfg: dict) -> dict:
    if cfg.get("model_type") != "whisper":
        raise ConversionError(
            f"config.json says model_type={cfg.get('model_type')!r}, not 'whisper': this is not a Whisper model")
    return dict(n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"], n_audio_state=cfg["d_model"],
                n_audio_head=cfg["encoder_attention_heads"], n_audio_layer=cfg["encoder_layers"],
                n_vocab=cfg["vocab_size"], n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
                n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"])


def hf_config_from_dims(dims: dict, special: dict) -> dict:
    """A transformers WhisperConfig dict; `special` holds the tokenizer's ids (sot, eot, ...)."""
    return {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": dims["n_mels"], "max_source_positions": dims["n_audio_ctx"], "d_model": dims["n_audio_state"],
        "encoder_attention_heads": dims["n_audio_head"], "encoder_layers": dims["n_audio_layer"],
        "encoder_ffn_dim": 4 * dims["n_audio_state"], "decoder_ffn_dim": 4 * dims["n_text_state"],
        "vocab_size": dims["n_vocab"], "max_target_positions": dims["n_text_ctx"],
        "decoder_attention_heads": dims["n_text_head"], "decoder_layers": dims["n_text_layer"],
        "num_hidden_layers": dims["n_audio_layer"], "activation_function": "gelu", "scale_embedding": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": special["eot"], "eos_token_id": special["eot"], "pad_token_id": special["eot"],
        "decoder_start_token_id": special["sot"], "begin_suppress_tokens": [220, special["eot"]],
    }


def hf_generation_config(tok, dims: dict, alignment_heads) -> dict:
    """generation_config.json for transformers' generate: language and task tokens, suppression, timestamps."""
    multilingual = tok.language is not None
    suppress = sorted(set(tok.non_speech_tokens))
    return {
        "decoder_start_token_id": tok.sot, "bos_token_id": tok.eot, "eos_token_id": tok.eot, "pad_token_id": tok.eot,
        "begin_suppress_tokens": [220, tok.eot], "suppress_tokens": suppress, "max_length": dims["n_text_ctx"],
        "is_multilingual": multilingual, "no_timestamps_token_id": tok.no_timestamps, "prev_sot_token_id": tok.sot_prev,
        "max_initial_timestamp_index": 50, "alignment_heads": alignment_heads, "return_timestamps": False,
        "lang_to_id": {f"<|{code}|>": tid for code, tid in zip(tok.all_language_codes, tok.all_language_tokens)}
        if multilingual else {},
        "task_to_id": {"transcribe": tok.transcribe, "translate": tok.translate} if multilingual else {},
    }


def hf_preprocessor_config(dims: dict) -> dict:
    """preprocessor_config.json: transformers' WhisperFeatureExtractor with whisper's log-mel settings."""
    return {"feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor",
            "feature_size": dims["n_mels"], "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
            "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
            "padding_value": 0.0, "return_attention_mask": False}


def hf_tokenizer_config() -> dict:
    """tokenizer_config.json beside HF's tokenizer.json (the fast tokenizer reads its vocabulary from that file)."""
    eot = "<|endoftext|>"
    return {"tokenizer_class": "WhisperTokenizer", "processor_class": "WhisperProcessor", "model_max_length": 1024,
            "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot, "add_prefix_space": False,
            "errors": "replace"}


# --- CTranslate2 -> openai -------------------------------------------------------------------------

# Type ids in the order of CTranslate2's DataType enum (specs/model_spec.py: _dtype_to_type_id).
_CT2_DTYPES = [np.float32, np.int8, np.int16, np.int32, np.float16, None]  # 5 = bfloat16, handled apart
_CT2_VERSIONS = (5, 6)


def read_ct2_model(blob: bytes) -> tuple[dict, dict]:
    """Parse a CTranslate2 `model.bin`: header, named tensors (dtype, shape), then aliases.

    Returns ({name: torch.Tensor}, {"name": spec name, "revision": int}). Raises ConversionError on a
    truncated or foreign file instead of a struct error deep inside.
    """
    view = memoryview(blob)
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(view):
            raise ConversionError(f"model.bin is truncated (needed {size} bytes at offset {pos} of {len(view)})")
        (value,) = struct.unpack_from(fmt, view, pos)
        pos += size
        return value

    def take_string():
        nonlocal pos
        n = take("H")
        if pos + n > len(view):
            raise ConversionError("model.bin is truncated inside a name")
        s = bytes(view[pos:pos + n - 1]).decode("utf-8", errors="replace")
        pos += n
        return s

    version = take("I")
    if version not in _CT2_VERSIONS:
        raise ConversionError(f"model.bin has binary version {version}; this reader knows versions {_CT2_VERSIONS}"
                              " (is it a CTranslate2 model?)")
    spec_name, revision = take_string(), take("I")
    tensors = {}
    for _ in range(take("I")):
        name = take_string()
        shape = [take("I") for _ in range(take("B"))]
        type_id, nbytes = take("B"), take("I")
        if pos + nbytes > len(view):
            raise ConversionError(f"model.bin is truncated inside tensor {name!r}")
        raw = view[pos:pos + nbytes]
        pos += nbytes
        if type_id == 5:  # bfloat16: numpy has no such type, torch does
            t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
        elif 0 <= type_id < len(_CT2_DTYPES):
            t = torch.from_numpy(np.frombuffer(raw, dtype=_CT2_DTYPES[type_id]).copy())
        else:
            raise ConversionError(f"tensor {name!r} has unknown dtype id {type_id}")
        tensors[name] = t.reshape(shape)
    for _ in range(take("I")):
        alias, target = take_string(), take_string()
        tensors[alias] = tensors[target]
    return tensors, {"name": spec_name, "revision": revision}


def _weight(t: dict, prefix: str) -> torch.Tensor:
    w = t[prefix + "/weight"]
    scale = t.get(prefix + "/weight_scale")
    if scale is not None:  # int8 / int16 quantised: q = round(w * scale), scale per output row
        w = w.float() / scale.float().reshape(-1, *([1] * (w.dim() - 1)))
    return w.float()


def _linear(t, src, dst, out, bias=True):
    out[dst + ".weight"] = _weight(t, src)
    if bias:
        out[dst + ".bias"] = t[src + "/bias"].float()


def _ln(t, src, dst, out):
    out[dst + ".weight"] = t[src + "/gamma"].float()
    out[dst + ".bias"] = t[src + "/beta"].float()


def _split_fused(t, src, dst, out, names):
    """Split CTranslate2's fused projection (QKV or KV) into openai-whisper's separate Linears.

    openai-whisper's `key` has no bias; CTranslate2 stores zeros there. A key bias would only add
    the same constant to every logit of a query row, which softmax removes, so dropping it is exact.
    """
    w, b = _weight(t, src), t[src + "/bias"].float()
    for name, wi, bi in zip(names, w.chunk(len(names)), b.chunk(len(names))):
        out[f"{dst}.{name}.weight"] = wi.contiguous()
        if name != "key":
            out[f"{dst}.{name}.bias"] = bi.contiguous()


def _block(t, src, dst, out):
    """The self-attention and MLP parts every encoder and decoder layer has."""
    _split_fused(t, f"{src}/self_attention/linear_0", f"{dst}.attn", out, ("query", "key", "value"))
    _linear(t, f"{src}/self_attention/linear_1", f"{dst}.attn.out", out)
    _ln(t, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", out)
    _linear(t, f"{src}/ffn/linear_0", f"{dst}.mlp.0", out)
    _linear(t, f"{src}/ffn/linear_1", f"{dst}.mlp.2", out)
    _ln(t, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", out)


def ct2_to_openai(tensors: dict) -> tuple[dict, dict]:
    """CTranslate2 WhisperSpec tensors -> (openai-whisper dims, state_dict)."""
    t = tensors
    try:
        n_audio_layer = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"encoder/layer_(\d+)/", k)))
        n_text_layer = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"decoder/layer_(\d+)/", k)))
        emb = t["decoder/embeddings/weight"]
        dims = dict(n_mels=t["encoder/conv1/weight"].shape[1], n_audio_ctx=t["encoder/position_encodings/encodings"].shape[0],
                    n_audio_state=t["encoder/conv1/weight"].shape[0], n_audio_head=int(t["encoder/num_heads"]),
                    n_audio_layer=n_audio_layer, n_vocab=emb.shape[0],
                    n_text_ctx=t["decoder/position_encodings/encodings"].shape[0], n_text_state=emb.shape[1],
                    n_text_head=int(t["decoder/num_heads"]), n_text_layer=n_text_layer)
        s = {}
        _linear(t, "encoder/conv1", "encoder.conv1", s)
        _linear(t, "encoder/conv2", "encoder.conv2", s)
        s["encoder.positional_embedding"] = t["encoder/position_encodings/encodings"].float()
        for i in range(n_audio_layer):
            _block(t, f"encoder/layer_{i}", f"encoder.blocks.{i}", s)
        _ln(t, "encoder/layer_norm", "encoder.ln_post", s)
        s["decoder.token_embedding.weight"] = emb.float()
        s["decoder.positional_embedding"] = t["decoder/position_encodings/encodings"].float()
        for i in range(n_text_layer):
            src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
            _block(t, src, dst, s)
            _linear(t, f"{src}/attention/linear_0", f"{dst}.cross_attn.query", s)
            _split_fused(t, f"{src}/attention/linear_1", f"{dst}.cross_attn", s, ("key", "value"))
            _linear(t, f"{src}/attention/linear_2", f"{dst}.cross_attn.out", s)
            _ln(t, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", s)
        _ln(t, "decoder/layer_norm", "decoder.ln", s)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"model.bin is not a CTranslate2 Whisper model (missing or bad tensor: {e})") from None
    proj = t.get("decoder/projection/weight")
    if proj is not None and not torch.equal(proj.float(), s["decoder.token_embedding.weight"]):
        raise ConversionError("model.bin has an output projection that differs from the token embedding;"
                              " openai-whisper ties the two, so this model cannot be represented")
    return dims, s


def alignment_mask(heads, n_layer: int, n_head: int) -> torch.Tensor:
    """CTranslate2 config's [[layer, head], ...] -> openai-whisper's boolean alignment-head mask."""
    mask = torch.zeros(n_layer, n_head, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


# --- openai -> CTranslate2 -------------------------------------------------------------------------

# Scalars every WhisperSpec model.bin carries (CTranslate2 specs: WhisperEncoderSpec, TransformerDecoderSpec
# with GELU and no embedding scaling), as the official converter writes them at spec revision 3.
_CT2_SCALARS = {"decoder/activation": np.int8(3), "decoder/alibi": np.int8(0), "decoder/alignment_heads": np.int16(1),
                "decoder/alignment_layer": np.int16(-1), "decoder/pre_norm": np.int8(1),
                "decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0)}
CT2_QUANTIZATIONS = ("float32", "float16", "int8", "int8_float32", "int8_float16")


def _put_linear(s, src, dst, out, bias=True):
    out[dst + "/weight"] = s[src + ".weight"]
    if bias:
        out[dst + "/bias"] = s[src + ".bias"]


def _put_ln(s, src, dst, out):
    out[dst + "/gamma"], out[dst + "/beta"] = s[src + ".weight"], s[src + ".bias"]


def _put_fused(s, src, dst, out, names):
    """openai-whisper's separate projections -> CTranslate2's fused one; the key has no bias, so its part is zero."""
    out[dst + "/weight"] = torch.cat([s[f"{src}.{n}.weight"] for n in names])
    out[dst + "/bias"] = torch.cat([s[f"{src}.{n}.bias"] if n != "key" else torch.zeros(s[f"{src}.{n}.weight"].shape[0])
                                    for n in names])


def _put_block(s, src, dst, out):
    _put_fused(s, f"{src}.attn", f"{dst}/self_attention/linear_0", out, ("query", "key", "value"))
    _put_linear(s, f"{src}.attn.out", f"{dst}/self_attention/linear_1", out)
    _put_ln(s, f"{src}.attn_ln", f"{dst}/self_attention/layer_norm", out)
    _put_linear(s, f"{src}.mlp.0", f"{dst}/ffn/linear_0", out)
    _put_linear(s, f"{src}.mlp.2", f"{dst}/ffn/linear_1", out)
    _put_ln(s, f"{src}.mlp_ln", f"{dst}/ffn/layer_norm", out)


def openai_to_ct2(dims: dict, state: dict) -> dict:
    """openai-whisper (dims, state_dict) -> CTranslate2 WhisperSpec tensors (float32), the inverse of ct2_to_openai."""
    s = {k: v.detach().cpu().float() for k, v in state.items()}
    t = {}
    _put_linear(s, "encoder.conv1", "encoder/conv1", t)
    _put_linear(s, "encoder.conv2", "encoder/conv2", t)
    t["encoder/position_encodings/encodings"] = s["encoder.positional_embedding"]
    for i in range(dims["n_audio_layer"]):
        _put_block(s, f"encoder.blocks.{i}", f"encoder/layer_{i}", t)
    _put_ln(s, "encoder.ln_post", "encoder/layer_norm", t)
    t["decoder/embeddings/weight"] = s["decoder.token_embedding.weight"]
    t["decoder/position_encodings/encodings"] = s["decoder.positional_embedding"]
    for i in range(dims["n_text_layer"]):
        src, dst = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        _put_block(s, src, dst, t)
        _put_linear(s, f"{src}.cross_attn.query", f"{dst}/attention/linear_0", t)
        _put_fused(s, f"{src}.cross_attn", f"{dst}/attention/linear_1", t, ("key", "value"))
        _put_linear(s, f"{src}.cross_attn.out", f"{dst}/attention/linear_2", t)
        _put_ln(s, f"{src}.cross_attn_ln", f"{dst}/attention/layer_norm", t)
    _put_ln(s, "decoder.ln", "decoder/layer_norm", t)
    t = {k: v.numpy() for k, v in t.items()}
    t.update(_CT2_SCALARS)
    t["encoder/num_heads"], t["decoder/num_heads"] = np.int16(dims["n_audio_head"]), np.int16(dims["n_text_head"])
    return t


def quantize_ct2(tensors: dict, quantization: str) -> dict:
    """CTranslate2's weight quantization, as its converter does it (specs/model_spec.py `_quantize`).

    The weights of linear, convolution and embedding layers become int8 with one float32 scale per output row
    (`<name>_scale`, q = round(w * scale), scale = 127 / max|row|) or float16; every other float tensor becomes
    float32 (int8, int8_float32) or float16 (float16, int8_float16). Scalars keep their integer types.
    """
    if quantization not in CT2_QUANTIZATIONS:
        raise ConversionError(f"quantization {quantization!r}: expected one of {', '.join(CT2_QUANTIZATIONS)}")
    out = {}
    for name, v in tensors.items():
        if v.ndim == 0:
            out[name] = v
            continue
        quantizable = name.endswith("/weight") and "layer_norm" not in name
        if quantizable and quantization.startswith("int8"):
            rows = v.reshape(v.shape[0], -1).astype(np.float32)
            amax = np.abs(rows).max(axis=1)
            amax[amax == 0] = 127.0
            amax = np.maximum(amax, np.float32(127) / np.finfo(np.float32).max)
            scale = (127.0 / amax).astype(np.float32)
            out[name] = np.rint(rows * scale[:, None]).astype(np.int8).reshape(v.shape)
            out[name + "_scale"] = scale
        elif quantization in ("float16", "int8_float16"):
            out[name] = v.astype(np.float16)
        else:
            out[name] = v.astype(np.float32)
    return out


def write_ct2_model(path, tensors: dict, aliases: dict | None = None, *, revision: int = 3) -> None:
    """Write a CTranslate2 `model.bin` (binary version 6): header, tensors sorted by name, then aliases."""
    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
                np.dtype(np.float16): 4}

    def string(f, s):
        b = s.encode("utf-8")
        f.write(struct.pack("H", len(b) + 1) + b + b"\0")

    with open(path, "wb") as f:
        f.write(struct.pack("I", 6))
        string(f, "WhisperSpec")
        f.write(struct.pack("I", revision))
        f.write(struct.pack("I", len(tensors)))
        for name in sorted(tensors):
            v = np.asarray(tensors[name])  # a scalar stays 0-d (ascontiguousarray would make it 1-d)
            v = np.ascontiguousarray(v) if v.ndim else v
            string(f, name)
            f.write(struct.pack("B", v.ndim) + b"".join(struct.pack("I", d) for d in v.shape))
            f.write(struct.pack("B", type_ids[v.dtype]) + struct.pack("I", v.nbytes))
            f.write(v.tobytes())
        aliases = aliases or {}
        f.write(struct.pack("I", len(aliases)))
        for alias in sorted(aliases):
            string(f, alias)
            string(f, aliases[alias])


def _byte_to_unicode() -> dict:
    """GPT-2's printable stand-in for every byte, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def ct2_vocabulary(tokenizer, n_vocab: int) -> list[str]:
    """The model's tokens as CTranslate2's vocabulary.txt lists them: byte-level BPE strings, then the specials."""
    enc = tokenizer.encoding
    to_char = _byte_to_unicode()
    vocab = [None] * n_vocab
    for token, rank in enc._mergeable_ranks.items():
        if rank < n_vocab:
            vocab[rank] = "".join(to_char[b] for b in token)
    for token, rank in enc._special_tokens.items():
        if rank < n_vocab:
            vocab[rank] = {"<|nospeech|>": "<|nocaptions|>"}.get(token, token)  # the name HF's tokenizer uses
    missing = [i for i, v in enumerate(vocab) if v is None]
    if missing:
        raise ConversionError(f"the tokenizer has no token for ids {missing[:5]} of this model's {n_vocab}")
    return vocab
