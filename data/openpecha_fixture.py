"""A small local copy of the OpenPecha schema, so the OpenPecha recipe can be dry-run offline.

openpecha/stt-training-data has no audio column: each row names its clip by `url` (data/sources.py downloads
it). This writes OUT/train.parquet and OUT/test.parquet in that schema (file_name, uni, wylie, url, dept, grade,
char_len, audio_len in seconds) from the clips of a local manifest corpus, the demo corpus by default, each `url`
the file:// URL of a clip. `--data openpecha:OUT` then runs every step a real run takes (parquet, grade filter,
department map, downloads with their progress and summary, validation, training, evaluation) on a CPU, offline.
The audio is the corpus's (synthetic, for the demo): a dry run says the recipe works, not how well it does.

    python -m data.openpecha_fixture --out /tmp/op
    python train.py --config configs/openpecha_tiny.json --data openpecha:/tmp/op --max-rows 30 \
        --dialect-map STT_AM=amdo,KH=kham,NS=utsang --model offline:base --max-steps 2 --batch-size 2 \
        --grad-accum 1 --num-workers 0 --eval-samples 2 --amp fp32 --audio-ctx auto
"""
import argparse
from itertools import zip_longest
from pathlib import Path

import numpy as np

from data.sources import load_manifest, parse_dialect_map

# the department written for each dialect label: as in OpenPecha, NS needs --dialect-map NS=utsang
DEPTS = {"amdo": "STT_AM", "kham": "KH", "utsang": "NS"}


def write_openpecha_fixture(out_dir, corpus=None, *, per_dept: int = 10, depts: dict = DEPTS, seed: int = 0) -> dict:
    """Write OUT/{train,test}.parquet; returns {split: {dept: rows}}.

    Each split holds up to `per_dept` clips of each dialect in `depts` ({dialect label: department}), drawn by
    `seed` from the corpus's {split}.jsonl (`corpus`: a directory; default: the demo corpus), rows interleaved
    by department, as real tables mix them and --max-rows takes the first rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if corpus is None:
        from data import synthetic  # lazy: building the demo needs espeak-ng

        corpus = synthetic.build_demo()
    corpus, out = Path(corpus), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {}
    for split in ("train", "test"):
        examples = load_manifest(corpus / f"{split}.jsonl")
        groups = []
        for dialect, dept in depts.items():
            pool = [e for e in examples if e.dialect == dialect]
            groups.append([(dept, pool[i]) for i in rng.permutation(len(pool))[:per_dept]])
        rows = [_row(dept, e, split, n, rng) for n, (dept, e) in
                enumerate(pair for group in zip_longest(*groups) for pair in group if pair is not None)]
        if not rows:
            raise ValueError(f"{corpus / f'{split}.jsonl'}: no clips of {sorted(depts)}")
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet")
        counts[split] = {dept: sum(r["dept"] == dept for r in rows) for dept in depts.values()}
    return counts


def _row(dept: str, e, split: str, n: int, rng) -> dict:
    seconds = e.duration
    if seconds is None:
        import soundfile as sf

        seconds = sf.info(e.audio).duration
    return {"file_name": f"{dept}_{split}_{n:05d}", "uni": e.text,
            "wylie": "",  # a transliteration; nothing in the recipe reads it
            "url": Path(e.audio).resolve().as_uri(), "dept": dept, "grade": int(rng.integers(1, 4)),
            "char_len": len(e.text), "audio_len": round(float(seconds), 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for train.parquet and test.parquet")
    p.add_argument("--corpus", default=None, help="a directory with train.jsonl / test.jsonl (default: the demo corpus)")
    p.add_argument("--per-dept", type=int, default=10, help="clips per department and split")
    p.add_argument("--depts", default=",".join(f"{d}={dept}" for d, dept in DEPTS.items()), metavar="DIALECT=DEPT,...",
                   help="the department written for each dialect label of the corpus")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.per_dept < 1:
        raise SystemExit(f"error: --per-dept {args.per_dept}: must be a positive integer")
    if args.corpus and not all((Path(args.corpus) / f"{s}.jsonl").is_file() for s in ("train", "test")):
        raise SystemExit(f"error: --corpus {args.corpus}: expected a directory with train.jsonl and test.jsonl")
    try:
        counts = write_openpecha_fixture(args.out, args.corpus, per_dept=args.per_dept,
                                         depts=parse_dialect_map(args.depts), seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for split, by_dept in counts.items():
        print(f"{args.out}/{split}.parquet: {sum(by_dept.values())} rows ({', '.join(f'{d} {n}' for d, n in by_dept.items())})")


if __name__ == "__main__":
    main()
