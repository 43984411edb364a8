"""Run every benchmark; each writes its JSON into benchmarks/results/.

    make bench        # or: .venv/bin/python benchmarks/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "bench_arm_int8.py": ["--out", str(HERE / "results" / "arm_int8.json")],
    "bench_binary.py": ["--out", str(HERE / "results" / "binary.json")],
    "bench_fp16_gpu.py": ["--out", str(HERE / "results" / "fp16_gpu.json")],
    "bench_gallery.py": ["--out", str(HERE / "results" / "gallery.json")],
    "bench_encodings.py": ["--out", str(HERE / "results" / "encodings.json")],
    "sparse_probe.py": ["--out", str(HERE / "results" / "sparse_probe.json")],
    "bench_pruners.py": ["--out", str(HERE / "results" / "pruners.json")],
    "bench_deep_compression.py": ["--out", str(HERE / "results" / "deep_compression.json")],
    "bench_distillers.py": ["--out", str(HERE / "results" / "distillers.json")],
    "bench_seed_methods.py": ["--out", str(HERE / "results" / "seed_methods.json")],
    "bench_bit_search.py": ["--out", str(HERE / "results" / "bit_search.json")],
}


def main() -> int:
    failed = []
    for script, args in BENCHES.items():
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode:
            failed.append(script)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
