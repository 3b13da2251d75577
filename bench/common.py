"""Shared by the benchmarks: where results go."""

import json
from pathlib import Path


def save_results(name: str, results: dict) -> Path:
    """Write bench/results/NAME.json (one flat object of figures and settings) and say so."""
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote bench/results/{name}.json")
    return out
