"""espeak-ng through ctypes, reading IPA that we convert to espeak phoneme mnemonics.

The `espeakng-loader` wheel ships libespeak-ng and its data (`get_library_path`, `get_data_path`).
espeak has no Tibetan voice, so we feed it phonemes in its `[[...]]` notation, using the phoneme table
of the Hindi voice: it has the aspirated (kʰ), retroflex (ʈ ɖ), palatal (c ɟ ɕ tɕ dʑ), breathy-voiced
and nasal-vowel sounds Tibetan needs, which makes it the closest inventory espeak offers. It has no
front rounded vowels, so ø and y are read as e and i (see IPA_TO_ESPEAK).

Tone is realised with embedded pitch commands (ctrl-A, value, 'P') before each word: espeak applies them
at word boundaries without a pause, which matches Lhasa-type tone (a property of the word, carried by
its first syllable).

Determinism. libespeak-ng keeps synthesis state across utterances (pitch flutter index, glottal phase,
gain control), so the same text synthesised twice in one process differs in its samples, and even
espeak_Terminate + espeak_Initialize does not reset it. Each clip is therefore synthesised in a fresh
fork of a helper process that has initialised the library but never spoken: every clip starts from the
same state, so its samples depend only on its own parameters, not on order or worker; the noise generator
is reseeded per clip too (see synthesize_once). The library is not
thread-safe either; each helper is a separate process with its own copy.
"""
import ctypes
import json
import os
import queue
import struct
import subprocess
import sys
import unicodedata

SAMPLE_RATE = 22050  # espeak-ng's native rate for its formant voices
BASE_VOICE = "hi"
# Speaker variety: espeak's voice variants (formant and pitch settings) over the Hindi phoneme table.
VARIANTS = ("m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f3", "f4")

# IPA segment (as data.lexicon parses it) -> espeak mnemonic in the Hindi phoneme table.
IPA_TO_ESPEAK = {
    # stops and affricates: '#' marks aspiration, '.' retroflex, ';' alveolo-palatal
    # bophono's MST writes final -b/-g as ʔp̚/ʔk̚: a glottal stop, the unreleased stop is inaudible
    "p": "p", "p̚": "", "pʰ": "p#", "b": "b", "b̥": "p",
    "t": "t", "tʰ": "t#", "d": "d", "d̥": "t",
    "ʈ": "t.", "ʈʰ": "t.#", "ɖ": "d.",
    "c": "c", "cʰ": "c#", "ɟ": "J", "ɟ̊": "c",
    "k": "k", "k̚": "", "kʰ": "k#", "g": "g", "g̊": "k", "ʔ": "?",
    "ts": "ts", "tsʰ": "ts#", "t͡s": "ts", "t͡sʰ": "ts#", "dz": "dz", "dz̥": "ts",
    "tɕ": "tS;", "tɕʰ": "tS;#", "dʑ": "dZ;", "dʑ̥": "tS;",
    "ʈ͡ʂ": "t.s.", "ʈ͡ʂʰ": "t.s.#", "ɖ͡ʐ": "d.z.", "d͡ʐ": "d.z.",
    # fricatives
    "s": "s", "sʰ": "s", "z": "z", "ɕ": "S;", "ʑ": "z;", "ʂ": "s.", "ʐ": "z.",
    "x": "x", "ɣ": "Q", "ʁ": "Q\"", "h": "h", "l̥ʰ": "l#", "l̥": "l#", "ɬ": "l#",
    # sonorants; an unreleased final n only marks the (already nasal) vowel in bophono's MST output
    "m": "m", "n": "n", "n̚": "", "ɲ": "n^", "ŋ": "N", "l": "l", "r": "r", "ɾ": "r",
    "w": "w", "j": "j",
    # vowels (oral, nasal); no front rounded vowels in the table
    "a": "a", "ə": "@", "ɛ": "E", "e": "e", "i": "i", "o": "o", "ɔ": "O", "u": "u",
    "ø": "e", "y": "i", "ɨ": "I",
    "ã": "a~", "ə̃": "V~", "ɛ̃": "E~", "ẽ": "e~", "ĩ": "i~", "õ": "o~", "ɔ̃": "O~", "ũ": "u~",
    "ø̃": "e~", "ỹ": "i~", "ɨ̃": "I~",
}
# bophono writes nasal vowels decomposed (a + U+0303); so do we, whatever this file's editor produced.
IPA_TO_ESPEAK = {unicodedata.normalize("NFD", k): v for k, v in IPA_TO_ESPEAK.items()}
_LONG_OK = {"a", "e", "i", "o", "u", "E", "O"}  # vowels with a long counterpart ("a:") in the table


def vowel_to_espeak(vowel):
    """A vowel as data.lexicon.parse_syllable returns it (base, optional tilde and length mark)."""
    base = unicodedata.normalize("NFD", vowel.replace("ː", ""))
    if base not in IPA_TO_ESPEAK:
        raise ValueError(f"no espeak phoneme for vowel {vowel!r}; add it to IPA_TO_ESPEAK")
    out = IPA_TO_ESPEAK[base]
    return out + ":" if "ː" in vowel and out in _LONG_OK else out


def segments_to_espeak(segments):
    try:
        return "".join(IPA_TO_ESPEAK[unicodedata.normalize("NFD", s)] for s in segments)
    except KeyError as e:
        raise ValueError(f"no espeak phoneme for IPA {e.args[0]!r}; add it to IPA_TO_ESPEAK") from None


# --- the library -----------------------------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8, _PHONEMES = 0x1, 0x100  # espeak_Synth flags: UTF-8 text, allow [[phonemes]]
_RATE, _PITCH, _RANGE = 1, 3, 4      # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def load_library():
    """Load and initialise libespeak-ng from the espeakng-loader wheel; returns the ctypes handle."""
    import espeakng_loader
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"espeak_Initialize returned {rate}, expected sample rate {SAMPLE_RATE}")
    return lib


def synthesize_once(lib, text, voice, rate, pitch, pitch_range):
    """Speak `text` (may hold [[phonemes]] and embedded commands); int16 mono samples as bytes.
    Call it once per process state: see the module docstring on determinism."""
    chunks = []

    def on_audio(wav, n, _events):
        if n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    # Breathy variants mix in noise from libc rand(), which espeak_Initialize seeds from the clock.
    ctypes.CDLL(None).srand(0)
    lib.espeak_ng_SetRandSeed(0)
    callback = _CALLBACK(on_audio)  # keep a reference for the duration of the call
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak has no voice {voice!r}")
    for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
        lib.espeak_SetParameter(param, int(value), 0)
    data = text.encode()
    status = lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, _CHARS_UTF8 | _PHONEMES, None, None)
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r}")
    return b"".join(chunks)


# --- helper process: one fork per clip -------------------------------------------------------------
def _read_all(fd):
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def serve():
    """Helper main loop: a JSON job per stdin line -> (status, length) header + samples on stdout."""
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the C library prints must not corrupt the protocol stream
    lib = load_library()
    for line in sys.stdin:
        job = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: fresh copy of the never-used library state
            os.close(r)
            try:
                _write_all(w, synthesize_once(lib, **job))
                code = 0
            except BaseException as e:  # report, never return into the parent's loop
                print(f"espeak helper: {e!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        os.close(w)
        samples = _read_all(r)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        ok = os.waitstatus_to_exitcode(status) == 0
        proto.write(struct.pack("<BQ", 0 if ok else 1, len(samples)) + samples)
        proto.flush()


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SynthPool:
    """`n` helper processes; `synthesize(**job)` may be called from n threads at once."""

    def __init__(self, n):
        cmd = [sys.executable, "-c", "import data.espeak as e; e.serve()"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                       for _ in range(n)]
        self._free = queue.Queue()
        for p in self._procs:
            self._free.put(p)

    def synthesize(self, text, voice, rate, pitch, pitch_range):
        proc = self._free.get()
        try:
            job = dict(text=text, voice=voice, rate=rate, pitch=pitch, pitch_range=pitch_range)
            proc.stdin.write((json.dumps(job) + "\n").encode())
            proc.stdin.flush()
            header = proc.stdout.read(9)
            if len(header) != 9:
                raise RuntimeError(f"espeak helper exited (code {proc.poll()}); see its stderr above")
            failed, n = struct.unpack("<BQ", header)
            samples = proc.stdout.read(n)
            if failed:
                raise RuntimeError(f"espeak could not synthesise {job}; see its stderr above")
            return samples
        finally:
            self._free.put(proc)

    def close(self):
        for p in self._procs:
            p.stdin.close()
        for p in self._procs:
            p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
