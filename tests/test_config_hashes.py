"""Every row's resolved config hash under every preset, pinned: a refactor of params.yaml / rows.yaml that
changes none (no row re-trains) keeps this test green; a change of a row's config shows up here, row by row.

After an intended change: `python tests/test_config_hashes.py --write` and commit the diff of
tests/data/config_hashes.json with the change (the diff lists exactly the rows that will train again).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / "tests" / "data" / "config_hashes.json"


def current_hashes() -> dict[str, dict[str, str]]:
    from tlvit.config import config_hash, load_params, load_rows, resolve_run_config

    params = load_params(REPO / "params.yaml")
    rows_path = REPO / "experiments" / "rows.yaml"
    return {preset: {row: config_hash(resolve_run_config(params, row, preset=preset, rows_path=rows_path,
                                                         params_path=REPO / "params.yaml"))
                     for row in sorted(load_rows(rows_path))}
            for preset in sorted(params["presets"])}


def test_every_rows_config_hash_is_pinned():
    pinned = json.loads(PINNED.read_text())
    now = current_hashes()
    changed = [f"{preset}/{row}: {pinned.get(preset, {}).get(row)} -> {h}"
               for preset, rows in now.items() for row, h in rows.items() if pinned.get(preset, {}).get(row) != h]
    gone = [f"{preset}/{row}" for preset, rows in pinned.items() for row in rows if row not in now.get(preset, {})]
    assert not changed and not gone, (
        "resolved configs changed (these rows would train again):\n" + "\n".join(changed + [f"{g}: removed" for g in gone])
        + "\nif intended: python tests/test_config_hashes.py --write")


if __name__ == "__main__":
    if "--write" in sys.argv:
        sys.path.insert(0, str(REPO))
        PINNED.write_text(json.dumps(current_hashes(), indent=1, sort_keys=True) + "\n")
        print(f"{PINNED}: written")
