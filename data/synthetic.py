"""The offline multi-dialect demo corpus: synthetic Tibetan speech in three dialects, built on the machine.

What it is. Short Tibetan-script sentences (3-5 words from a 100-word lexicon and a small SOV grammar
written for this project, see data/lexicon.py), each spoken in one of three dialect pronunciations:
Utsang from bophono's Standard/Lhasa IPA, Amdo from bophono's Amdo IPA, Kham from our own documented
rule set between the two. The IPA is read by espeak-ng (data/espeak.py) with seeded speaker, rate
and pitch variation, resampled to 16 kHz mono PCM_16. The same parameters give byte-identical files.

What it is for. Running the training loop, the tests and the dialect study end to end with no network
and no dataset download, on a CPU, in minutes: the dialects differ systematically (tone or none,
pre-initial clusters, final consonants, vowel quality), so a model trained on one dialect transfers
imperfectly to the others, and per-dialect CER moves when it learns.

What it is not. It is not real speech and not real Tibetan dialect data: a formant synthesiser with a
Hindi phoneme table, speaking a tiny closed vocabulary. Error rates on it say whether the code works
and how methods compare on this toy task; they are not comparable to the research notes' numbers on
openpecha/stt-training-data, and a model trained on it is of no use for real Tibetan ASR.

Held-out sentences. The grammar's ~2100 sentences are split once, by a hash of their text, into a
train pool (80%) and a test pool (20%); no test sentence is ever a training sentence, for any dialect
or seed. Each dialect's test clips prefer sentences whose every word occurs in that dialect's training
clips, so test CER measures generalisation to new word combinations, not unseen words.

Layout of a corpus directory: train.jsonl, test.jsonl (one clip per line: id, audio (relative path),
text, dialect, language, duration), synthesis.jsonl (per clip: IPA, espeak input, voice, rate, pitch),
wav/<split>/<dialect>/<id>.wav, and corpus.json (version, parameters, counts, seconds, build time).

    python -m data.synthetic --out /tmp/demo        # then listen to /tmp/demo/wav/test/*/...
"""
import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from data import espeak
from data.lexicon import DIALECTS, all_sentences, parse_syllable, pronounce, sentence_text, word_tone

VERSION = 1  # bump when anything that changes the audio or the manifests changes
SAMPLE_RATE = 16000
MIN_SECONDS, MAX_SECONDS = 1.0, 6.0
_EDGE_SECONDS = 0.1     # silence kept before and after speech
_SILENCE_LEVEL = 100    # |int16| below this counts as silence when trimming espeak's padding
_TEST_POOL_SHARE = 5    # one sentence in 5 is reserved for test
# Word pitch relative to the clip's base pitch (espeak pitch units, 0-99) for each lexical tone.
TONE_PITCH = {"high": 14, "high-falling": 9, "low": -12, "low-rising-falling": -6}


# --- what each clip says and how -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Clip:
    id: str
    split: str
    dialect: str
    words: tuple
    voice: str
    rate: int
    pitch: int
    pitch_range: int

    @property
    def audio(self):
        return f"wav/{self.split}/{self.dialect}/{self.id}.wav"


def _stable_hash(text):
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)


def sentence_pools():
    """(train pool, test pool): disjoint lists of sentences, independent of seed and sizes."""
    train, test = [], []
    for s in all_sentences():
        (test if _stable_hash(sentence_text(s)) % _TEST_POOL_SHARE == 0 else train).append(s)
    return train, test


def plan_corpus(n_train, n_test, seed, dialects):
    """Every clip of the corpus (sentence and voice settings), from a seeded RNG; no audio yet."""
    train_pool, test_pool = sentence_pools()
    if n_train > len(train_pool) or n_test > len(test_pool):
        raise ValueError(f"at most {len(train_pool)} train and {len(test_pool)} test sentences per dialect, "
                         f"asked for n_train={n_train}, n_test={n_test}")
    clips = []
    for dialect in dialects:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected some of {DIALECTS}")
        rng = random.Random(f"{seed}/{dialect}")  # string seeds are stable across runs and platforms
        train = rng.sample(train_pool, n_train)
        vocab = {w for s in train for w in s}
        # Fully covered sentences first, in random order; then the least uncovered, if there are too few.
        order = {s: rng.random() for s in test_pool}
        test = sorted(test_pool, key=lambda s: (sum(w not in vocab for w in s), order[s]))[:n_test]
        for split, sentences in (("train", train), ("test", test)):
            for i, words in enumerate(sentences):
                clips.append(Clip(
                    id=f"{dialect}-{split}-{i:04d}", split=split, dialect=dialect, words=words,
                    voice=f"{espeak.BASE_VOICE}+{rng.choice(espeak.VARIANTS)}",
                    rate=rng.randint(140, 185), pitch=rng.randint(38, 62), pitch_range=rng.randint(30, 70)))
    return clips


def espeak_word(word, dialect):
    """espeak phonemes of one word: primary stress on the first syllable (Utsang, Kham: tone-bearing
    syllable) or on the last (Amdo, whose disyllables have a rising low-high pitch pattern)."""
    syllables = []
    for syl in pronounce(word, dialect).split("."):
        onset, vowel, coda, _ = parse_syllable(syl)
        syllables.append(espeak.segments_to_espeak(onset) + espeak.vowel_to_espeak(vowel)
                         + espeak.segments_to_espeak(coda))
    stressed = len(syllables) - 1 if dialect == "amdo" else 0
    syllables[stressed] = "'" + syllables[stressed]
    return "".join(syllables)


def espeak_text(words, dialect, base_pitch):
    """espeak input for a sentence: per word, a pitch command (its tone) and its [[phonemes]]."""
    parts = []
    for w in words:
        tone = word_tone(w, dialect)
        pitch = min(99, max(0, base_pitch + (TONE_PITCH[tone] if tone else 0)))
        parts.append(f"\x01{pitch}P [[{espeak_word(w, dialect)}]]")
    return " ".join(parts)


def sentence_ipa(words, dialect):
    return " ".join(pronounce(w, dialect) for w in words)


# --- audio -----------------------------------------------------------------------------------------
class _Resampler:
    """22050 -> 16000 Hz with torchaudio's windowed-sinc kernel, built once; float64 on CPU so the
    result does not depend on thread scheduling."""

    def __init__(self):
        import torch
        import torchaudio
        self._resample = torchaudio.transforms.Resample(espeak.SAMPLE_RATE, SAMPLE_RATE, dtype=torch.float64)

    def __call__(self, samples):
        import torch
        x = torch.from_numpy(samples.astype(np.float64) / 32768.0)
        with torch.no_grad():
            y = self._resample(x[None])[0].numpy()
        return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)


def _trim_and_pad(samples):
    """Cut espeak's leading/trailing silence, keep a fixed margin, pad to MIN_SECONDS (centred)."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > _SILENCE_LEVEL)
    if len(loud) == 0:
        raise RuntimeError("espeak produced silence")
    edge = int(_EDGE_SECONDS * SAMPLE_RATE)
    core = samples[loud[0]:loud[-1] + 1]
    short = max(0, int(MIN_SECONDS * SAMPLE_RATE) - len(core) - 2 * edge)
    before = edge + short // 2
    return np.concatenate([np.zeros(before, np.int16), core, np.zeros(edge + short - short // 2, np.int16)])


def _render(clip, pool, resample):
    """Synthesise one clip; if it would exceed MAX_SECONDS, speak faster (deterministically)."""
    rate = clip.rate
    for _ in range(4):
        text = espeak_text(clip.words, clip.dialect, clip.pitch)
        raw = np.frombuffer(pool.synthesize(text, clip.voice, rate, clip.pitch, clip.pitch_range), np.int16)
        audio = _trim_and_pad(resample(raw))
        if len(audio) <= MAX_SECONDS * SAMPLE_RATE:
            return audio, text, rate
        rate = int(rate * 1.3)
    raise RuntimeError(f"{clip.id}: longer than {MAX_SECONDS} s even at rate {rate}")


# --- the corpus directory --------------------------------------------------------------------------
def default_dir(params):
    root = Path(os.environ.get("WHISPER_FT_CACHE", Path.home() / ".cache" / "whisper_ft"))
    key = hashlib.sha1(json.dumps({"version": VERSION, **params}, sort_keys=True).encode()).hexdigest()[:10]
    return root / f"demo-{key}"


def _stamp_matches(out_dir, params):
    stamp_path = out_dir / "corpus.json"
    if not stamp_path.exists():
        return False
    stamp = json.loads(stamp_path.read_text())
    return stamp.get("version") == VERSION and stamp.get("params") == params


def build_demo(out_dir=None, *, n_train=300, n_test=60, seed=0, dialects=DIALECTS, workers=2):
    """Build (or find cached) the demo corpus; returns its directory. n_train/n_test are per dialect.

    A directory whose corpus.json matches version and parameters is returned at once. The corpus is
    written to a temporary sibling directory and renamed into place, so an interrupted build never
    leaves a directory that looks complete."""
    params = {"n_train": int(n_train), "n_test": int(n_test), "seed": int(seed), "dialects": list(dialects)}
    out_dir = Path(out_dir) if out_dir is not None else default_dir(params)
    if _stamp_matches(out_dir, params):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a demo corpus with parameters {params} "
                              f"(version {VERSION}); remove it or choose another --out")
    started = time.time()
    clips = plan_corpus(n_train, n_test, seed, dialects)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rows = _write_clips(tmp, clips, workers)
        counts = {}
        for split in ("train", "test"):
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for clip, row, _ in rows:
                    if clip.split == split:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        counts.setdefault(split, {}).setdefault(clip.dialect, 0)
                        counts[split][clip.dialect] += 1
        with open(tmp / "synthesis.jsonl", "w", encoding="utf-8") as f:
            for clip, row, detail in rows:
                f.write(json.dumps({"id": clip.id, **detail}, ensure_ascii=False) + "\n")
        stamp = {"version": VERSION, "params": params, "counts": counts, "clips": len(rows),
                 "total_seconds": round(sum(r["duration"] for _, r, _ in rows), 3),
                 "sample_rate": SAMPLE_RATE, "build_seconds": round(time.time() - started, 2),
                 "synthetic": True}
        (tmp / "corpus.json").write_text(json.dumps(stamp, indent=1) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory in one step
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if _stamp_matches(out_dir, params):  # a concurrent build of the same corpus won the rename
            return out_dir
        raise
    return out_dir


def _write_clips(tmp, clips, workers):
    import soundfile as sf
    for split in {c.split for c in clips}:
        for dialect in {c.dialect for c in clips}:
            (tmp / "wav" / split / dialect).mkdir(parents=True, exist_ok=True)
    resample = _Resampler()

    def one(clip):
        audio, text, rate = _render(clip, pool, resample)
        sf.write(tmp / clip.audio, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        row = {"id": clip.id, "audio": clip.audio, "text": sentence_text(clip.words), "dialect": clip.dialect,
               "language": "bo", "duration": round(len(audio) / SAMPLE_RATE, 4)}
        detail = {"ipa": sentence_ipa(clip.words, clip.dialect), "espeak": text.replace("\x01", "^A"),
                  "voice": clip.voice, "rate": rate, "pitch": clip.pitch, "range": clip.pitch_range}
        return clip, row, detail

    workers = max(1, min(workers, os.cpu_count() or 1))
    with espeak.SynthPool(workers) as pool, concurrent.futures.ThreadPoolExecutor(workers) as threads:
        futures = [threads.submit(one, clip) for clip in clips]
        try:
            return [f.result() for f in futures]  # in clip order, so manifests are deterministic
        except BaseException:
            for f in futures:  # stop at the first failure instead of finishing the corpus
                f.cancel()
            raise


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the offline synthetic multi-dialect Tibetan demo corpus.")
    ap.add_argument("--out", type=Path, default=None, help="corpus directory (default: the cache directory)")
    ap.add_argument("--n-train", type=int, default=300, help="training clips per dialect")
    ap.add_argument("--n-test", type=int, default=60, help="test clips per dialect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dialects", nargs="+", default=list(DIALECTS), choices=DIALECTS)
    args = ap.parse_args(argv)
    t = time.time()
    out = build_demo(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, dialects=args.dialects)
    stamp = json.loads((out / "corpus.json").read_text())
    mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    print(f"{out}: {stamp['clips']} clips {stamp['counts']}, {stamp['total_seconds'] / 60:.1f} min of audio, "
          f"{mb:.1f} MB; built in {stamp['build_seconds']:.1f} s (this call {time.time() - t:.1f} s)")


if __name__ == "__main__":
    main()
