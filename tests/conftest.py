import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

# Tests run on 2 cores next to other work: one intra-op thread keeps timings stable.
torch.set_num_threads(1)


def tiny_dims(n_mels=80, n_layer=2, n_state=64, n_head=2, n_vocab=51865):
    """Whisper-shaped dims small enough to train in a test (multilingual vocabulary)."""
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=n_state, n_audio_head=n_head,
                           n_audio_layer=n_layer, n_vocab=n_vocab, n_text_ctx=448, n_text_state=n_state,
                           n_text_head=n_head, n_text_layer=n_layer)


def make_tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Whisper(tiny_dims(**kw))
    # openai-whisper leaves the decoder's learned positions as torch.empty (they come from checkpoints)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tokenizer():
    return whisper.tokenizer.get_tokenizer(multilingual=True, language="bo", task="transcribe")


# Tibetan syllables for made-up transcripts of test clips: real script, so the tokenizer and normaliser see
# the combining marks they see in real data.
SYLLABLES = ["ཀ", "ཁ", "ག", "ང", "ཅ", "ཆ", "ཇ", "ཉ", "ཏ", "ཐ", "ད", "ན", "པ", "ཕ", "བ", "མ", "བོད", "ཡིག", "སྐད", "ལྷ"]


def make_corpus(root, n_per_dialect=4, dialects=("utsang", "amdo", "kham"), n_test=2, seed=0):
    """A tiny manifest corpus (train.jsonl / test.jsonl + 16 kHz wavs): tones whose pitch follows the text."""
    import json
    import pathlib

    import numpy as np
    import soundfile as sf

    root = pathlib.Path(root)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_dialect), ("test", n_test)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for d, dialect in enumerate(dialects):
                for i in range(n):
                    k = 1 + (i + d) % 4  # 1-4 syllables: different token counts per clip
                    sylls = [SYLLABLES[j] for j in rng.integers(0, len(SYLLABLES), k)]
                    text = "་".join(sylls)
                    t = np.arange(int(16000 * (0.5 + 0.25 * k))) / 16000
                    wav = sum(0.1 * np.sin(2 * np.pi * (200 + 40 * SYLLABLES.index(s)) * t) for s in sylls)
                    wav = (wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
                    rel = f"wav/{split}-{dialect}-{i}.wav"
                    sf.write(root / rel, wav, 16000)
                    f.write(json.dumps({"id": f"{split}-{dialect}-{i}", "audio": rel, "text": text,
                                        "dialect": dialect, "language": "bo", "duration": t.size / 16000},
                                       ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """A directory with tiny.pt (a tiny model in openai format) and corpus/ (4 train + 1 test clips per dialect)."""
    from whisper_ft.models import export_openai

    d = tmp_path_factory.mktemp("run")
    export_openai(make_tiny_model(), d / "tiny.pt")
    make_corpus(d / "corpus", n_per_dialect=4, n_test=1)
    return d
