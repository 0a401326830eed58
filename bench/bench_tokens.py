"""Tibetan token counts per second of audio, default tokenizer vs --add-tokens auto:N (whisper_ft/vocab.py).

    python bench/bench_tokens.py                  # the demo corpus and the OpenPecha-schema fixture, N = 100, 500

Tokens are chosen from each corpus's train text (the fixture has no split: its own text, which flatters it) and
counted on its train and test text; the fixture is also counted with the demo's tokens (chosen elsewhere). Per
row: text tokens, and whether prefix + text exceed the decoder's 448 positions.
"""
import argparse
import os
import sys
from types import SimpleNamespace

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.sources import load_examples  # noqa: E402
from whisper_ft.text import extend_tokenizer, normalize_text  # noqa: E402
from whisper_ft.vocab import frequent_syllables, token_report  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "openpecha_tibetan.parquet")


def corpora():
    """{name: (examples to choose tokens from, examples to count)}"""
    train, _ = load_examples("demo", "train")
    test, _ = load_examples("demo", "test")
    rows = [SimpleNamespace(text=r["uni"], language="bo", duration=r["audio_len"]) for r in pq.read_table(FIXTURE).to_pylist()]
    return {"demo (train + test)": (train, train + test), "OpenPecha-schema fixture": (rows, rows)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="100,500", help="auto:N values")
    args = p.parse_args(argv)
    import whisper

    base = whisper.tokenizer.get_tokenizer(True, language="bo", task="transcribe")
    print("| corpus | tokenizer | added | rows | audio s | tokens | tokens / s | rows over 448 |\n|---|---|---|---|---|---|---|---|")
    chosen_on_demo = {}
    for name, (choose_from, count) in corpora().items():
        tokenizers = {"default": base}
        for n in map(int, args.n.split(",")):
            added = frequent_syllables([normalize_text(e.text, e.language) for e in choose_from], n, base)
            tokenizers[f"auto:{n}"] = extend_tokenizer(base, added)
        tokenizers.update(chosen_on_demo)
        chosen_on_demo = {f"demo's {k}": v for k, v in tokenizers.items() if k != "default"}
        for tok_name, r in token_report(count, tokenizers).items():
            print(f"| {name} | {tok_name} | {len(getattr(tokenizers[tok_name], 'added', ()))} | {len(count)} | "
                  f"{r['audio_s']} | {r['tokens']} | {r['tokens_per_s']} | {r['over_ctx']} |")


if __name__ == "__main__":
    main()
