#!/usr/bin/env python3
"""Encode lines with the reference SentencePiece library, for comparison with our tokenizer.

usage: tokenizer_compare.py MODEL LINES OUT.json

LINES is UTF-8 text split on '\\n' only (lines may contain '\\r' and other separators that
str.splitlines() would break on). OUT.json gets, per line, the ids of a plain encode (no
BOS/EOS) and the decode of those ids, plus the best of three single-threaded timings (CPU time) of
encoding all lines.
"""
import json
import sys
import time

import sentencepiece as spm


def main():
    model, lines_path, out_path = sys.argv[1:4]
    sp = spm.SentencePieceProcessor(model_file=model)
    with open(lines_path, "rb") as f:
        data = f.read()
    lines = data.decode("utf-8").split("\n")

    ids = [sp.encode(line) for line in lines]
    loop_s = batch_s = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for line in lines:
            sp.encode(line)
        loop_s = min(loop_s, time.process_time() - t0)
        t0 = time.process_time()
        sp.encode(lines, num_threads=1)
        batch_s = min(batch_s, time.process_time() - t0)

    decoded = [sp.decode(x) for x in ids]
    out = {
        "version": spm.__version__,
        "lines": len(lines),
        "bytes": len(data),
        "ids": ids,
        "decoded": decoded,
        "loop_seconds": loop_s,
        "batch_seconds": batch_s,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True)


if __name__ == "__main__":
    main()
