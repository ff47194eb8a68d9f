#!/usr/bin/python3
"""Runs the library's benchmarks and their PyTorch eager counterparts one after the other and prints the ratios.

  phase       benchmarks/ppo_phase (the library's PPOTrainer) against ppo_phase.py --variant seed and --variant lean,
              per stage and precision: seconds, eager / library, x floor (the floor from the library run's measured
              matmul ceiling and copy bandwidth: the work is the same, so is the floor)
  generation  generation_bench against ppo_phase.py --mode generation (tokens/s at batch 1 and 16; fp32, bf16
              weights, and fp32 weights under bf16 autocast)
  train-step  train_step_bench --no-lora against ppo_phase.py --mode train-step (fp32 and bf16 autocast)

--repeats N runs each comparison N times, library and eager alternating, and reports medians: each ratio is the
median of the N library / eager ratios of adjacent runs, so a machine whose speed drifts during the comparison
(shared cores) moves both sides of a pair alike. The phase runs in N rounds of every precision and variant.

Then the issue's targets, each with the measured value. Run it on an idle machine: every number is a wall-clock
time on the same cores.

  /usr/bin/python3 benchmarks/python/compare.py --build build-bench [--shape small|tiny] [--threads N]
      [--precision fp32 bf16] [--variant seed lean] [--only phase generation train-step] [--out compare.json]
      [--wait-idle SECONDS] [--repeats N] [--new-tokens 32]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EAGER = os.path.join(HERE, "ppo_phase.py")
STAGES = ("generation", "reward", "reference", "training")
TINY = dict(layers=2, width=64, heads=4, vocab=1024)


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the output:\n" + text[-2000:])


def busy_cpu_seconds():
    """CPU seconds spent by every process of the machine so far (user + nice + system + irq + softirq + steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(max_wait, threshold=0.1, window=5.0):
    """Waits (at most max_wait seconds) until the cores were less than `threshold` busy over `window` seconds."""
    deadline = time.monotonic() + max_wait
    while True:
        before = busy_cpu_seconds()
        time.sleep(window)
        busy = (busy_cpu_seconds() - before) / (window * (os.cpu_count() or 1))
        if busy < threshold or time.monotonic() >= deadline:
            return busy


OTHER_LOAD = []  # per run: CPU seconds other processes used while it ran


def run(cmd, wait_idle=0):
    """Runs a benchmark, echoes its table, returns its JSON result. Reports how much CPU other processes took while it
    ran: the run is only comparable with others when that is near 0."""
    if wait_idle:
        wait_until_idle(wait_idle)
    print("$ " + " ".join(cmd), flush=True)
    start, busy_before = time.perf_counter(), busy_cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - start
    own = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
    other = max(0.0, busy_cpu_seconds() - busy_before - own)
    OTHER_LOAD.append(dict(command=" ".join(cmd), seconds=wall, other_cpu_seconds=other))
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("{")))
    print(f"({wall:.0f} s; other processes used {other:.1f} CPU-s meanwhile, "
          f"{100 * other / (wall * (os.cpu_count() or 1)):.0f}% of the cores)\n", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed with exit code {proc.returncode}")
    return last_json_line(proc.stdout)


def ratio(a, b):
    return a / b if a and b else float("nan")


def compare_phase(a, results):
    """Runs the phase a.repeats times (each round: per precision the library, then each eager variant); returns
    {precision: [library runs]} and {(variant, precision): [eager runs]}, round by round."""
    lib, eager = {}, {}
    for i in range(a.repeats):
        if a.repeats > 1:
            print(f"-- phase round {i + 1} of {a.repeats}")
        for precision in a.precision:
            lib.setdefault(precision, []).append(
                run([os.path.join(a.build, "benchmarks", "ppo_phase"), "--shape", a.shape, "--precision", precision,
                     "--threads", str(a.threads), "--device", a.device], a.wait_idle))
            for variant in a.variant:
                eager.setdefault((variant, precision), []).append(
                    run([a.python, EAGER, "--mode", "phase", "--variant", variant, "--shape", a.shape, "--precision",
                         precision, "--threads", str(a.threads), "--device", a.device], a.wait_idle))
    print("PPO phase: seconds per stage, eager / library, and x floor (floor from the library run's ceiling and "
          "bandwidth)" + (f"; medians of {a.repeats} rounds, each ratio the median of the rounds' ratios"
                          if a.repeats > 1 else ""))
    table = []

    def stage_of(result, stage):
        return result["stages"][stage] if stage != "phase" else result["phase"]

    for precision in a.precision:
        runs = lib[precision]
        header = f"{precision:<5} {'stage':<11} {'library s':>10} {'x floor':>8}"
        for variant in a.variant:
            header += f" {variant + ' s':>10} {variant + '/lib':>9} {'x floor':>8}"
        print(header)
        for stage in STAGES + ("phase",):
            ls = [stage_of(r, stage) for r in runs]
            seconds, floor = median_of([x["seconds"] for x in ls]), median_of([x["floor_seconds"] for x in ls])
            row = f"{precision:<5} {stage:<11} {seconds:>10.3f} {ratio(seconds, floor):>8.1f}"
            entry = dict(precision=precision, stage=stage, library_seconds=seconds, floor_seconds=floor,
                         library_peak_rss_mb=max(x["peak_rss_mb"] for x in ls))
            for variant in a.variant:
                es = [stage_of(r, stage) for r in eager[(variant, precision)]]
                e_seconds = median_of([x["seconds"] for x in es])
                over = median_of([ratio(e["seconds"], x["seconds"]) for e, x in zip(es, ls)])
                row += f" {e_seconds:>10.3f} {over:>9.2f} {ratio(e_seconds, floor):>8.1f}"
                entry[f"{variant}_seconds"] = e_seconds
                entry[f"{variant}_over_library"] = over
                entry[f"{variant}_peak_rss_mb"] = max(x["peak_rss_mb"] for x in es)
            print(row)
            table.append(entry)
        peaks = f"{precision:<5} peak RSS MB: library {max(r['phase']['peak_rss_mb'] for r in runs):.0f} (bound " \
                f"{runs[0]['memory']['bound_mb']:.0f})"
        for variant in a.variant:
            peaks += f", {variant} {max(r['phase']['peak_rss_mb'] for r in eager[(variant, precision)]):.0f}"
        print(peaks + "\n")
    results["phase"] = dict(repeats=a.repeats, library=lib, eager={f"{v}-{p}": r for (v, p), r in eager.items()},
                            table=table)
    return lib, eager


def run_pairs(a, lib_cmd, eager_cmd):
    """Runs the library's and eager's benchmark a.repeats times, alternating; returns both lists of JSON results."""
    lib, eager = [], []
    for i in range(a.repeats):
        if a.repeats > 1:
            print(f"-- pair {i + 1} of {a.repeats}")
        lib.append(run(lib_cmd, a.wait_idle))
        eager.append(run(eager_cmd, a.wait_idle))
    return lib, eager


def median_of(values):
    values = [v for v in values if v == v]  # NaN left out
    return statistics.median(values) if values else float("nan")


def compare_generation(a, results):
    shape = ["--layers", str(TINY["layers"]), "--width", str(TINY["width"]), "--heads", str(TINY["heads"]),
             "--vocab", str(TINY["vocab"])] if a.shape == "tiny" else []
    libs, eagers = run_pairs(
        a, [os.path.join(a.build, "benchmarks", "generation_bench"), "--new-tokens", str(a.new_tokens), "--batch",
            "1", "16", "--threads", str(a.threads)] + shape,
        [a.python, EAGER, "--mode", "generation", "--shape", a.shape, "--new-tokens", str(a.new_tokens), "--batch",
         "1", "16", "--threads", str(a.threads)])
    print(f"Sampling (KV cache, 16-token prompts, {a.new_tokens} new tokens, top-k 10): tokens/s and library / eager"
          + (f", medians of {a.repeats} alternating pairs" if a.repeats > 1 else ""))
    print(f"{'dtype':<8} {'batch':>5} {'library':>9} {'x floor':>8} {'seed':>9} {'lib/seed':>9} {'lean':>9} "
          f"{'lib/lean':>9}")
    table = []
    for r in libs[0]["results"]:
        def case(result, variant=None):
            return next(x for x in result["results"] if x["dtype"] == r["dtype"] and x["batch"] == r["batch"]
                        and (variant is None or x["variant"] == variant))
        lib_runs = [case(l) for l in libs]
        seed_runs = [case(e, "seed")["tokens_per_s"] for e in eagers]
        lean_runs = [case(e, "lean")["tokens_per_s"] for e in eagers]
        entry = dict(dtype=r["dtype"], batch=r["batch"],
                     library=median_of([x["tokens_per_s"] for x in lib_runs]),
                     x_floor=median_of([x.get("x_floor", float("nan")) for x in lib_runs]),
                     seed=median_of(seed_runs), lean=median_of(lean_runs),
                     library_over_seed=median_of([ratio(x["tokens_per_s"], e) for x, e in zip(lib_runs, seed_runs)]),
                     library_over_lean=median_of([ratio(x["tokens_per_s"], e) for x, e in zip(lib_runs, lean_runs)]),
                     library_over_lean_runs=[ratio(x["tokens_per_s"], e) for x, e in zip(lib_runs, lean_runs)])
        print(f"{r['dtype']:<8} {r['batch']:>5} {entry['library']:>9.1f} {entry['x_floor']:>8.2f} "
              f"{entry['seed']:>9.1f} {entry['library_over_seed']:>9.2f} {entry['lean']:>9.1f} "
              f"{entry['library_over_lean']:>9.2f}")
        table.append(entry)
    if a.repeats > 1:
        print("library / lean per pair: " + "; ".join(
            f"{e['dtype']} b{e['batch']} " + " ".join(f"{x:.2f}" for x in e["library_over_lean_runs"])
            for e in table))
    print()
    results["generation"] = dict(library=libs, eager=eagers, table=table)
    return table


def compare_train_step(a, results):
    shape = ["--layers", str(TINY["layers"]), "--width", str(TINY["width"]), "--heads", str(TINY["heads"]),
             "--vocab", str(TINY["vocab"])] if a.shape == "tiny" else []
    libs, eagers = run_pairs(
        a, [os.path.join(a.build, "benchmarks", "train_step_bench"), "--no-lora", "--threads", str(a.threads)]
        + shape, [a.python, EAGER, "--mode", "train-step", "--shape", a.shape, "--threads", str(a.threads)])
    print("Learning step (8 x 66 tokens, 50 scored, forward + backward + AdamW): s/step and eager / library"
          + (f", medians of {a.repeats} alternating pairs" if a.repeats > 1 else ""))
    table = []
    for r in libs[0]["results"]:
        lib_runs = [next(x for x in l["results"] if x["precision"] == r["precision"]) for l in libs]
        eager_runs = [next(x for x in e["results"] if x["precision"] == r["precision"]) for e in eagers]
        entry = dict(precision=r["precision"],
                     library_seconds=median_of([x["seconds_per_step"] for x in lib_runs]),
                     library_tflops=median_of([x["tflops"] for x in lib_runs]),
                     eager_seconds=median_of([x["seconds_per_step"] for x in eager_runs]),
                     eager_tflops=median_of([x["tflops"] for x in eager_runs]),
                     eager_over_library=median_of([ratio(e["seconds_per_step"], x["seconds_per_step"])
                                                   for x, e in zip(lib_runs, eager_runs)]))
        print(f"{r['precision']:<5} library {entry['library_seconds']:.3f} s ({entry['library_tflops']:.3f} "
              f"TFLOP/s), eager {entry['eager_seconds']:.3f} s ({entry['eager_tflops']:.3f} TFLOP/s): "
              f"eager / library {entry['eager_over_library']:.2f}")
        table.append(entry)
    print()
    results["train_step"] = dict(library=libs, eager=eagers, table=table)
    return table


def targets(a, results, phase, generation, train_step):
    """The issue's targets with their measured values (benchmarks, not tests: nothing fails)."""
    out = []

    def check(name, value, goal, ok):
        out.append(dict(target=name, value=value, goal=goal, met=bool(ok)))
        print(f"  [{'met' if ok else 'NOT met'}] {name}: {value:.2f} (goal {goal})")

    print("Targets")
    if phase:
        lib, eager = phase  # lists of runs, round by round

        def speedup(eager_runs, lib_runs):  # the median of the rounds' ratios
            return median_of([ratio(e["phase"]["seconds"], x["phase"]["seconds"])
                              for e, x in zip(eager_runs, lib_runs)])

        # the library's default precision (auto) as ppo_phase resolves it on this device: bf16 where it computes
        # bf16 products natively, else fp32
        default = next(iter(lib.values()))[0].get("default_precision", "fp32") if lib else "fp32"
        if default in lib and ("seed", "fp32") in eager:
            r = speedup(eager[("seed", "fp32")], lib[default])
            check(f"phase, library {default} (its default here) vs seed-style eager fp32, speed-up", r, ">= 5", r >= 5)
        for p in lib:
            if ("lean", p) in eager:
                r = speedup(eager[("lean", p)], lib[p])
                check(f"phase, library vs lean eager, both {p}, speed-up", r, ">= 1.5", r >= 1.5)
            worst = max(x["memory"]["peak_rss_mb"] / x["memory"]["bound_mb"] for x in lib[p])
            check(f"phase {p} peak RSS / accounted bound (the largest of the rounds)", worst, "<= 1", worst <= 1)
            check(f"phase {p} measured / floor", median_of([x["phase"]["x_floor"] for x in lib[p]]),
                  "as low as possible", True)
    ceiling_bf16 = None
    if phase:
        ceiling_bf16 = next(iter(phase[0].values()))[0]["ceiling_tflops"]["bf16"]
    if train_step and ceiling_bf16:
        bf16 = next((r for r in train_step if r["precision"] == "bf16"), None)
        if bf16:
            f = bf16["library_tflops"] / ceiling_bf16
            check("training fwd+bwd bf16, share of the bf16 matmul ceiling", f, ">= 0.5", f >= 0.5)
    if generation:
        for r in generation:
            if r["batch"] == 16:
                x = r["library_over_lean"]
                check(f"sampling batch 16 {r['dtype']}, library / lean eager KV cache", x, ">= 2", x >= 2)
            if r["batch"] == 1 and r.get("x_floor"):
                check(f"sampling batch 1 {r['dtype']}, time / bandwidth floor", r["x_floor"], "<= 2",
                      r["x_floor"] <= 2)
    results["targets"] = out


def main():
    p = argparse.ArgumentParser(description="library vs PyTorch eager, stage by stage")
    p.add_argument("--build", default="build", help="the CMake build folder holding benchmarks/")
    p.add_argument("--shape", choices=["small", "tiny"], default="small")
    p.add_argument("--threads", type=int, default=0, help="0 = all cores")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the PPO phase runs (phase comparison only)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--variant", nargs="+", choices=["seed", "lean"], default=["seed", "lean"])
    p.add_argument("--only", nargs="+", choices=["phase", "generation", "train-step"],
                   default=["phase", "generation", "train-step"])
    p.add_argument("--python", default="/usr/bin/python3", help="the interpreter with Debian's torch")
    p.add_argument("--out", default="", help="write every result and ratio to this JSON file")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each run, wait up to this long for the cores to be idle (a shared machine)")
    p.add_argument("--new-tokens", type=int, default=32, metavar="N",
                   help="tokens generated per prompt in the sampling comparison (more: longer, steadier runs)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run every comparison N times, library and eager alternating, and report medians")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    a.threads = a.threads or os.cpu_count() or 1
    results = dict(shape=a.shape, threads=a.threads, load_average_at_start=os.getloadavg()[0])
    phase = compare_phase(a, results) if "phase" in a.only else None
    generation = compare_generation(a, results) if "generation" in a.only else None
    train_step = compare_train_step(a, results) if "train-step" in a.only else None
    targets(a, results, phase, generation, train_step)
    results["load_average_at_end"] = os.getloadavg()[0]
    results["other_load"] = OTHER_LOAD
    print("CPU taken by other processes during each run (numbers are comparable only where this is near 0):")
    for r in OTHER_LOAD:
        print(f"  {r['other_cpu_seconds']:7.1f} CPU-s in {r['seconds']:6.0f} s  {r['command']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
