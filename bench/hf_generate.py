"""HF transformers' batched `generate` on an openai-whisper checkpoint: the peer row of bench_decode.py.

Runs in bench/.venv-peers (transformers breaks `datasets` in the product venv), as a subprocess of
bench_decode.py, which passes the model and the mel in one torch.save file:

    bench/.venv-peers/bin/python bench/hf_generate.py IN.pt OUT.json [--threads 2] [--default-heap]

IN.pt: {"dims": whisper ModelDimensions as a dict, "state": openai-whisper state_dict, "mel": [B, 80, 3000],
"language": "en"}. OUT.json: {"wall": s, "cpu": s, "tokens": [[text tokens] per clip]}; the text is
decoded by the caller with whisper's tokenizer, so all rows share one detokenizer. The weights are
renamed to transformers' layout (no download: the offline checkpoint the other rows use), and the
generation config is built from openai-whisper's tokenizer with whisper's default suppression, so the
search is the same greedy one as the other rows.
"""
import argparse
import copy
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.memory import keep_freed_memory  # noqa: E402  (ctypes only: no product packages)

# openai-whisper name -> transformers name, applied in order to every state_dict key
RENAMES = [
    (r"^encoder\.positional_embedding$", "model.encoder.embed_positions.weight"),
    (r"^decoder\.positional_embedding$", "model.decoder.embed_positions.weight"),
    (r"^decoder\.token_embedding\.", "model.decoder.embed_tokens."),
    (r"^encoder\.ln_post\.", "model.encoder.layer_norm."),
    (r"^decoder\.ln\.", "model.decoder.layer_norm."),
    (r"^(encoder|decoder)\.blocks\.", r"model.\1.layers."),
    (r"\.cross_attn_ln\.", ".encoder_attn_layer_norm."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."),
    (r"\.attn\.", ".self_attn."),
    (r"\.mlp_ln\.", ".final_layer_norm."),
    (r"\.mlp\.0\.", ".fc1."),
    (r"\.mlp\.2\.", ".fc2."),
    (r"\.query\.", ".q_proj."),
    (r"\.key\.", ".k_proj."),
    (r"\.value\.", ".v_proj."),
    (r"\.out\.", ".out_proj."),
    (r"^encoder\.conv", "model.encoder.conv"),
]


def hf_name(key: str) -> str:
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def build_model(dims: dict, state: dict):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=dims["n_vocab"], num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
                           encoder_layers=dims["n_audio_layer"], decoder_layers=dims["n_text_layer"],
                           encoder_attention_heads=dims["n_audio_head"], decoder_attention_heads=dims["n_text_head"],
                           encoder_ffn_dim=4 * dims["n_audio_state"], decoder_ffn_dim=4 * dims["n_text_state"],
                           max_source_positions=dims["n_audio_ctx"], max_target_positions=dims["n_text_ctx"])
    model = WhisperForConditionalGeneration(config)
    renamed = {hf_name(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    # proj_out is tied to the token embedding, and openai-whisper's key projections have no bias
    missing = [k for k in missing if k != "proj_out.weight" and not re.search(r"k_proj\.bias$", k)]
    if missing or unexpected:
        raise SystemExit(f"weight renaming is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    return model.eval()


def generation_config(n_vocab: int, language: str):
    import whisper
    from transformers import GenerationConfig

    from whisper_ft.decoding import suppress_tokens

    multilingual = n_vocab >= 51865
    tok = whisper.tokenizer.get_tokenizer(multilingual, num_languages=n_vocab - 51765 - int(multilingual),
                                          language=language if multilingual else None, task="transcribe")
    langs = {f"<|{code}|>": tid for code, tid in zip(tok.all_language_codes, tok.all_language_tokens)}
    return GenerationConfig(
        decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot, bos_token_id=tok.eot,
        is_multilingual=multilingual, lang_to_id=langs,
        task_to_id={"transcribe": tok.transcribe, "translate": tok.translate},
        no_timestamps_token_id=tok.no_timestamps, suppress_tokens=suppress_tokens(tok),
        begin_suppress_tokens=tok.encode(" ") + [tok.eot],
        do_sample=False, num_beams=1, max_new_tokens=224,  # greedy, whisper's sample_len
    ), tok.eot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-heap", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.default_heap:
        keep_freed_memory()
    from transformers.utils import logging

    logging.set_verbosity_error()  # its notes on deprecated argument mixes and pad == eos, per call
    blob = torch.load(args.inp, weights_only=False)
    model = build_model(blob["dims"], blob["state"])
    config, eot = generation_config(blob["dims"]["n_vocab"], blob["language"])
    mel = blob["mel"]
    kw = dict(language=blob["language"], task="transcribe", return_timestamps=False)
    with torch.no_grad():
        warm = copy.deepcopy(config)
        warm.max_new_tokens = 2
        model.generate(input_features=mel[:1], generation_config=warm, **kw)  # warm-up, as the others get
        w0, c0 = time.perf_counter(), time.process_time()
        seqs = model.generate(input_features=mel, generation_config=config, **kw)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    seqs = seqs.sequences if hasattr(seqs, "sequences") else seqs
    tokens = [[t for t in row if t < eot] for row in seqs.tolist()]  # drop prefix, end-of-text, padding
    with open(args.out, "w") as f:
        json.dump({"wall": wall, "cpu": cpu, "tokens": tokens}, f)


if __name__ == "__main__":
    main()
