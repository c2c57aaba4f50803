"""Run the tests that assert a training outcome (``pytest -m trajectory``) under numerics that differ in the last
bits, as another CPU's would, and print what each asserted under each setting.

A training run at the paper's settings is chaotic early on: an Intel and an AMD machine, or MKL's and oneDNN's code
paths for another ISA, or another thread count, give other last bits, and a few hundred steps later other losses.
A test must hold on all of them, so the marked tests assert only what has a margin. This script checks that on one
machine: each setting runs in its own pytest process (the settings are read when the libraries load), and each
marked test reports the values it asserted (``record_property``) into a JUnit XML file, gathered into one table.

    python scripts/perturbed_numerics.py                      # every setting; exit 1 if any test failed
    python scripts/perturbed_numerics.py --settings other-cpu --table table.md
"""
import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: environment variables
    "default": {},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "avx2": {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "one-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "isa-v2": {"SEQNORM_CPU_ISA": "x86-64-v2"},  # seqnorm's C kernels built for SSE4.2, no AVX, no FMA
    "other-cpu": {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "SEQNORM_CPU_ISA": "x86-64-v2"},
}


def run_setting(name: str, junit: Path, pytest_args: list[str]) -> int:
    env = {**os.environ, **SETTINGS[name]}
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in SETTINGS[name].items()) or '(as the machine is)'}",
          flush=True)
    command = [sys.executable, "-m", "pytest", "-m", "trajectory", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=legacy", *pytest_args]  # legacy: keeps the properties
    return subprocess.run(command, cwd=REPO, env=env).returncode


def read_junit(path: Path) -> dict[str, dict]:
    """{test id: {"outcome": passed | failed | skipped, property: value, ...}} from a JUnit XML file."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        results[test] = {"outcome": outcome, **props}
    return results


def table(by_setting: dict[str, dict]) -> str:
    """One row per (test, asserted value), one column per setting: value and threshold as the test recorded."""
    names = list(by_setting)
    rows = ["| test | value | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    tests = sorted({t for results in by_setting.values() for t in results})
    for test in tests:
        keys = sorted({k for r in by_setting.values() for k in r.get(test, {}) if k != "outcome"})
        for key in ["outcome", *keys]:
            cells = [by_setting[n].get(test, {}).get(key, "") for n in names]
            rows.append(f"| {test} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=[n for n in SETTINGS if n != "other-cpu"],
                        choices=sorted(SETTINGS), help="(default: every single setting, not the combined other-cpu)")
    parser.add_argument("--table", help="also write the markdown table here")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. tests/test_robust_start.py)")
    args = parser.parse_args(argv)
    by_setting, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            junit = Path(tmp) / f"{name}.xml"
            code = run_setting(name, junit, args.pytest_args)
            by_setting[name] = read_junit(junit) if junit.exists() else {}
            if code != 0:  # 5: no test collected, also a failure: the setting checked nothing
                failed.append(f"{name} (pytest exit {code})")
            if not any(r["outcome"] == "passed" for r in by_setting[name].values()):
                failed.append(f"{name}: ran no test (all skipped: is PTB there? $SEQNORM_DATA)")
            failed += [f"{name}: {t}" for t, r in by_setting[name].items() if r["outcome"] == "failed"]
    text = table(by_setting)
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    outcomes = [r["outcome"] for results in by_setting.values() for r in results.values()]
    if failed:
        print("failed: " + "; ".join(dict.fromkeys(failed)), file=sys.stderr)
    print(f"perturbed: {outcomes.count('passed')} passed, {outcomes.count('failed')} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
