"""Run the property-based fuzz tests (tests/test_fuzz.py) under the ``long`` hypothesis profile and
write what happened per test to benchmarks/results/fuzz.json: examples run (passing / failing /
invalid, i.e. filtered by ``assume``), distinct failures, the events (refusals by error type, cases
left out for known bugs), the largest relative output error hypothesis found where a tolerance
applies, why it stopped, the outcome and the wall time. ``--results-dir`` or ``--output`` write it
elsewhere.

``make fuzz`` runs it with 1000 examples per test (the ``long`` profile; expensive tests, such as
Compile('inductor'), run a fixed share of that, see ``budget()`` in test_fuzz.py), which takes
hours on a 2-core machine. ``--max-examples N`` (or $HYPOTHESIS_MAX_EXAMPLES) runs fewer; the
count actually used is in the JSON.

    HYPOTHESIS_PROFILE=long .venv/bin/python benchmarks/fuzz.py [--max-examples 50] [-k quantize]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import base_parser, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent


class FuzzReport:
    """A pytest plugin that keeps hypothesis' raw statistics and the outcome of every test."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}
        self.current: str | None = None

    def pytest_configure(self, config: Any) -> None:
        """Hook hypothesis once pytest has loaded its plugin (importing it earlier would keep pytest
        from rewriting the plugin's asserts)."""
        import hypothesis.core

        original = hypothesis.core.note_statistics

        def note(stats: Any) -> None:  # called by hypothesis once per @given test it ran
            if self.current is not None:
                self.tests.setdefault(self.current, {})["statistics"] = _summarize(stats)
            original(stats)

        hypothesis.core.note_statistics = note

    # ---------------------------------------------------------------- pytest hooks
    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self.current = nodeid
        self.tests.setdefault(nodeid, {"seconds": 0.0})

    def pytest_runtest_logreport(self, report: Any) -> None:
        entry = self.tests.setdefault(report.nodeid, {"seconds": 0.0})
        entry["seconds"] = round(entry.get("seconds", 0.0) + report.duration, 2)
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
            if report.failed:
                entry["error"] = str(report.longrepr).strip().splitlines()[-1][:500] if report.longrepr else ""


def _summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """hypothesis' per-phase statistics, reduced to counts."""
    statuses: Counter[str] = Counter()
    events: Counter[str] = Counter()
    phases = {}
    for key, phase in stats.items():
        if not key.endswith("-phase") or not isinstance(phase, dict):
            continue
        cases = phase.get("test-cases", [])
        counts = Counter(c["status"] for c in cases)
        statuses.update(counts)
        phases[key.removesuffix("-phase")] = {"test_cases": len(cases), "seconds": round(phase.get("duration-seconds", 0), 2),
                                             "distinct_failures": phase.get("distinct-failures", 0)}
        if key == "generate-phase":
            for case in cases:
                events.update(case.get("events", []))
    return {
        "examples_run": statuses["valid"] + statuses["interesting"],
        "passing": statuses["valid"], "failing": statuses["interesting"],
        "invalid": statuses["invalid"] + statuses["overrun"],
        "distinct_failures": max((p["distinct_failures"] for p in phases.values()), default=0),
        "events": dict(events.most_common()),
        "targets": stats.get("targets", {}),
        "stopped_because": stats.get("stopped-because"),
        "phases": phases,
    }


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--max-examples", type=int, default=None,
                        help="examples per test under the long profile (default $HYPOTHESIS_MAX_EXAMPLES or 1000)")
    parser.add_argument("-k", default=None, help="pytest -k expression to run a subset")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON file (default: RESULTS_DIR/fuzz.json)")
    args = parser.parse_args()
    output = args.output or args.results_dir / "fuzz.json"

    os.environ.setdefault("HYPOTHESIS_PROFILE", "long")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.max_examples is not None:
        os.environ["HYPOTHESIS_MAX_EXAMPLES"] = str(args.max_examples)
    max_examples = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "1000"))

    import pytest

    plugin = FuzzReport()
    pytest_args = [str(ROOT / "tests" / "test_fuzz.py"), "-q", "-p", "no:cacheprovider", "-rfE"]
    if args.k:
        pytest_args += ["-k", args.k]
    start = time.time()
    code = pytest.main(pytest_args, plugins=[plugin])
    seconds = round(time.time() - start, 1)

    import hypothesis
    import torch

    tests = [{"test": nodeid.split("::", 1)[-1], **entry} for nodeid, entry in plugin.tests.items()]
    fuzzed = [t for t in tests if "statistics" in t]
    result = {
        "what": "property-based fuzzing of every pass (tests/test_fuzz.py) under the hypothesis 'long' profile",
        "profile": os.environ["HYPOTHESIS_PROFILE"],
        "max_examples_per_test": max_examples,
        "note": ("max_examples is the profile's count; tests marked budget(..., long_share=s) run s x that "
                 "(Compile: 0.05, ONNX chains: 0.2). examples_run per test is what actually ran; "
                 "'invalid' examples were filtered out by assume() (e.g. known bugs left out of the strategy)."),
        "pytest_exit_code": int(code),
        "seconds": seconds,
        "totals": {
            "tests": len(tests), "fuzzed_tests": len(fuzzed),
            "examples_run": sum(t["statistics"]["examples_run"] for t in fuzzed),
            "failing_examples": sum(t["statistics"]["failing"] for t in fuzzed),
            "distinct_failures": sum(t["statistics"]["distinct_failures"] for t in fuzzed),
            "outcomes": dict(Counter(t.get("outcome", "?") for t in tests)),
        },
        "tests": tests,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": {"hypothesis": hypothesis.__version__, "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC",
    }
    try:
        from aigc_opt._deps import library_versions

        result["versions"].update(library_versions())
    except ImportError:
        pass
    write_text_atomic(output, json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {output}: {result['totals']}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
